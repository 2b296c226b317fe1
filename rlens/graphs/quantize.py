"""Weight-only block quantization: ``MatMul(x, W)`` -> ONNX Runtime's ``com.microsoft::MatMulNBits``.

A CPU decode step reads every weight once per token, so its speed is the bytes of the weights; int8
halves them against fp16 and quarters them against fp32, int4 halves them again. Only the weights
are quantized: activations stay float32 in the graph and ``accuracy_level`` says what ONNX Runtime
may do with them inside the kernel.

    W [K, N] fp32 (or W^T [N, K] behind a Transpose)
      -> per output column n, blocks of ``block_size`` along K (the last one zero-padded):
         scale = (max - min) / (2^bits - 1), zero point = round(-min / scale), min <= 0 <= max
         code  = clip(round(w / scale) + zero point, 0, 2^bits - 1)
      -> MatMulNBits(x, codes [N, k_blocks, blob], scales [N, k_blocks], zero_points [N, packed])

Asymmetric blocks (a zero point per block) rather than symmetric ones: a block is rarely centred on
0, and a zero point spends the whole code range on it, for half a byte (int4) or a byte (int8) per
block. On the toy model's decoder weights it cuts the rms error from 9.4% to 8.0% (int4, blocks of
32) and from 0.60% to 0.57% (int8, 128). The range always holds 0, so a zero weight stays exactly 0.

What becomes MatMulNBits is every MatMul by a 2-D float initializer: in the decoder, the q/k/v/o
projections, the FFN (PAD-FFN's text-and-probe path too) and ``lm_head``. The attention products
multiply two activations and stay; so do the embedding (a Gather) and the vision and TRIM graphs,
which ``rlens export`` leaves in fp32 (``rlens.exporter.export.write_graphs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rlens.precision import BLOCK_SIZE, PRECISIONS

MS_DOMAIN = "com.microsoft"

DEFAULT_ACCURACY_LEVEL = 4
"""ONNX Runtime may quantize each block of the activations to int8 and multiply in integers (level 4).

Measured on a 4096 x 4096 weight, one core: at level 0 (float compute) int8 has no fast kernel and a
decode step takes 57 ms against fp32's 2.4 ms; level 4 takes 0.63 ms (int8) and 0.47 ms (int4, which
takes 1.4 ms at level 0). What it adds to the error is small beside the weights' own: on the first
shipped toy model the int8 logit error goes from 5.7e-3 to 6.0e-3, the int4 one from 0.0707 to 0.0710.
"""


@dataclass(frozen=True)
class BlockQuantized:
    """One weight in MatMulNBits' layout: ``codes`` [N, k_blocks, blob] uint8, packed low bits first
    along K; ``scales`` [N, k_blocks] float32; ``zero_points`` [N, ceil(k_blocks * bits / 8)] uint8."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    k: int


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes < 2^bits, ``8 // bits`` per byte along the last axis, the first in the low bits."""
    per = 8 // bits
    grouped = values.reshape(*values.shape[:-1], -1, per).astype(np.uint8)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)


def quantize_blocks(w_t: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
    """Round-to-nearest block quantization of ``w_t`` [N, K] (a weight with its input axis last)."""
    assert bits in (4, 8), f"MatMulNBits on CPU takes 4 or 8 bits, got {bits}"
    n, k = w_t.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), np.float32)
    w[:, :k] = w_t
    w = w.reshape(n, blocks, block_size)  # [N, k_blocks, block]
    top = float((1 << bits) - 1)
    low = np.minimum(w.min(axis=-1), 0.0)
    high = np.maximum(w.max(axis=-1), 0.0)
    scales = ((high - low) / top).astype(np.float32)  # [N, k_blocks]
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)  # an all-zero block: any scale
    zero_points = np.clip(np.round(-low / safe), 0, top)
    codes = np.clip(np.round(w / safe[..., None]) + zero_points[..., None], 0, top)
    per = 8 // bits
    padded_points = np.zeros((n, -(-blocks // per) * per), np.uint8)
    padded_points[:, :blocks] = zero_points
    return BlockQuantized(
        codes=_pack(codes.astype(np.uint8), bits),
        scales=scales,
        zero_points=_pack(padded_points, bits),
        bits=bits,
        k=k,
    )


def dequantize(q: BlockQuantized) -> np.ndarray:
    """The weight MatMulNBits multiplies by, as ``[K, N]``: ``(code - zero point) * scale``."""
    n, blocks = q.scales.shape
    codes = _unpack(q.codes, q.bits).astype(np.float32)  # [N, k_blocks, block]
    points = _unpack(q.zero_points, q.bits)[:, :blocks].astype(np.float32)
    w = (codes - points[..., None]) * q.scales[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, : q.k].T)


class _LazyBlocks:
    """The three initializers of one quantized weight (``<name>.q<bits>``, ``.scales``,
    ``.zero_points``), computed when the first is written and handed out once each, so saving a graph
    holds one weight's quantization at a time, as ``rlens.graphs.builder.Weights`` streams fp32 ones.

    ``weight`` is ``[K, N]``, or ``[N, K]`` when ``transposed`` (the MatMul reads it through a Transpose).
    """

    def __init__(
        self, weight: ir.TensorProtocol, transposed: bool, bits: int, block_size: int, name: str
    ) -> None:
        self.weight, self.transposed, self.bits, self.block_size = weight, transposed, bits, block_size
        n, k = weight.shape if transposed else reversed(weight.shape)
        self.n, self.k = int(n), int(k)
        self._parts: dict[str, np.ndarray] = {}
        blocks = -(-self.k // block_size)
        shapes = {
            f"q{bits}": (ir.DataType.UINT8, [self.n, blocks, block_size * bits // 8]),
            "scales": (ir.DataType.FLOAT, [self.n, blocks]),
            "zero_points": (ir.DataType.UINT8, [self.n, -(-blocks * bits // 8)]),
        }
        self.values = []
        for part, (dtype, shape) in shapes.items():
            tensor = ir.LazyTensor(
                lambda part=part: self._part(part), dtype=dtype, shape=ir.Shape(shape), name=f"{name}.{part}"
            )
            self.values.append(
                ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(dtype), const_value=tensor)
            )

    def _part(self, part: str) -> ir.TensorProtocol:
        if part not in self._parts:
            w = self.weight.numpy()
            q = quantize_blocks(w if self.transposed else w.T, self.bits, self.block_size)
            self._parts = {f"q{self.bits}": q.codes, "scales": q.scales, "zero_points": q.zero_points}
        return ir.Tensor(self._parts.pop(part))


def _constant_weight(b: ir.Value) -> tuple[ir.Value, ir.Node | None] | None:
    """The 2-D float initializer behind a MatMul's right operand, and the Transpose in between if any.

    ``W`` is ``[K, N]``; ``Transpose(W^T, perm=[1, 0])`` is how PAD-FFN multiplies by the ``[d_ff, d]``
    rows it also gathers from, and is MatMulNBits' own ``[N, K]`` layout.
    """
    node = b.producer()
    transpose = None
    if node is not None and node.op_type == "Transpose" and node.domain == "":
        perm = node.attributes.get("perm")
        if perm is None or list(perm.as_ints()) != [1, 0] or node.inputs[0] is None:
            return None
        transpose, b = node, node.inputs[0]
    if not b.is_initializer() or b.const_value is None:
        return None
    if b.const_value.dtype != ir.DataType.FLOAT or len(b.const_value.shape) != 2:
        return None
    return b, transpose


class QuantizeMatMulWeights(ir.passes.InPlacePass):
    """Every ``MatMul`` whose right operand is a 2-D float initializer becomes ``MatMulNBits``.

    An initializer that no node reads any more is dropped; one that others still read (PAD-FFN
    gathers weight rows for its visual tokens) stays beside its quantized copy. MatMuls of two
    activations (attention) are untouched.
    """

    def __init__(self, bits: int, block_size: int, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> None:
        super().__init__()
        assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
        assert block_size >= 16 and block_size & (block_size - 1) == 0, f"block_size {block_size}"
        self.bits, self.block_size = bits, block_size
        self.attributes = dict(bits=bits, block_size=block_size, accuracy_level=accuracy_level)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        quantized: dict[tuple[str, bool], _LazyBlocks] = {}  # a weight shared by MatMuls: one copy
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "" or node.inputs[0] is None:
                continue
            found = _constant_weight(node.inputs[1])
            if found is None:
                continue
            weight, transpose = found
            assert weight.const_value is not None and weight.name is not None
            transposed = transpose is not None
            if (weight.name, transposed) not in quantized:
                name = weight.name + (".T" if transposed else "")
                blocks = _LazyBlocks(weight.const_value, transposed, self.bits, self.block_size, name)
                for value in blocks.values:
                    graph.register_initializer(value)
                quantized[weight.name, transposed] = blocks
            blocks = quantized[weight.name, transposed]
            replacement = ir.node(
                "MatMulNBits",
                [node.inputs[0], *blocks.values],
                dict(K=blocks.k, N=blocks.n, **self.attributes),
                domain=MS_DOMAIN,
                name=node.name,
            )
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [replacement], node.outputs, replacement.outputs
            )
            if transpose is not None and not transpose.outputs[0].uses():
                graph.remove(transpose, safe=True)
            if not weight.uses() and not weight.is_graph_output():
                graph.initializers.pop(weight.name)
            modified = True
        if modified:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified)


def quantize_weights(
    model: ir.Model, bits: int, block_size: int, accuracy_level: int = DEFAULT_ACCURACY_LEVEL
) -> ir.Model:
    """``model`` with its constant-weight MatMuls in ``bits``-bit MatMulNBits (in place; returned)."""
    return QuantizeMatMulWeights(bits, block_size, accuracy_level)(model).model


def with_precision(model: ir.Model, precision: str) -> ir.Model:
    """``model`` as ``--precision`` asks: unchanged for ``fp32``, float16 for ``fp16``
    (``rlens.graphs.half``), else its MatMul weights quantized."""
    if precision == "fp16":
        from rlens.graphs.half import to_half

        return to_half(model)
    bits = PRECISIONS[precision]
    return model if bits is None else quantize_weights(model, bits, BLOCK_SIZE[precision])
