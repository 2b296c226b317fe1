"""The decoder's feed-forward block, and its Probe-Activated Dynamic variant (PAD-FFN)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rlens.errors import RlensError
from rlens.graphs.attention import Chunk
from rlens.graphs.builder import GraphBuilder, Weights
from rlens.graphs.layers import activation


@dataclass(frozen=True)
class FfnWeights:
    """The three SwiGLU matrices as graph values, made once and shared by every path of a layer.

    ``down`` is ``[d_ff, d]`` (``[in, out]``). ``gate`` and ``up`` are ``[d, d_ff]`` in a plain layer;
    in a PAD-FFN layer they keep PyTorch's ``[d_ff, d]`` (``channels_first``), so that gathering the
    selected channels copies whole contiguous rows instead of scattered columns, and multiply as
    ``x @ W^T`` (ONNX Runtime folds that Transpose into its MatMul).
    """

    gate: ir.Value
    up: ir.Value
    down: ir.Value  # [d_ff, d]
    channels_first: bool = False

    @classmethod
    def of(cls, b: GraphBuilder, weights: Weights, prefix: str, channels_first: bool = False) -> FfnWeights:
        if any(f"{prefix}.{p}.bias" in weights for p in ("gate_proj", "up_proj", "down_proj")):
            raise RlensError("FFN layers with biases (mlp_bias=True) are not supported")
        gate, up = (
            b.weight(weights.get(f"{prefix}.{p}.weight", transpose=not channels_first))
            for p in ("gate_proj", "up_proj")
        )
        return cls(
            gate, up, b.weight(weights.get(f"{prefix}.down_proj.weight", transpose=True)), channels_first
        )

    def project(self, b: GraphBuilder, x: ir.Value, w: ir.Value) -> ir.Value:
        """``x`` through ``gate`` or ``up``, whatever their layout."""
        if not self.channels_first:
            return b.op("MatMul", x, w)
        return b.op("MatMul", x, b.op("Transpose", w, perm=[1, 0]))


def swiglu(b: GraphBuilder, x: ir.Value, w: FfnWeights, hidden_act: str) -> ir.Value:
    """``down(act(gate(x)) * up(x))``: the gated FFN of LLaMA, Mistral and Qwen2."""
    gate = activation(b, w.project(b, x, w.gate), hidden_act)
    return b.op("MatMul", b.op("Mul", gate, w.project(b, x, w.up)), w.down)


def swiglu_ffn(b: GraphBuilder, x: ir.Value, weights: Weights, prefix: str, hidden_act: str) -> ir.Value:
    with b.scope("mlp"):
        return swiglu(b, x, FfnWeights.of(b, weights, prefix), hidden_act)


def probe_columns(b: GraphBuilder, chunk: Chunk, probe_every: int) -> tuple[ir.Value, ir.Value]:
    """Each row's probe tokens as chunk columns ``[B, P]`` and their weights ``1/P_b`` (0 past P_b).

    ``P_b = max(1, V_b // s)`` and probe ``i`` is ``round(i (V_b - 1) / (P_b - 1))`` rounded half
    up, computed in integers exactly as ``rlens.reductions.probe_indices`` (so graph and reference
    pick the same tokens). Rows are padded to the largest ``P``; extra probes get weight 0.
    """
    assert chunk.visual_lengths is not None and chunk.visual_start is not None
    assert chunk.visual_max is not None and chunk.visual_any is not None
    one = b.const(1)
    with b.scope("probes"):
        lengths = b.op("Unsqueeze", chunk.visual_lengths, b.const([-1]))  # [B, 1]
        count = b.op("Max", b.op("Div", lengths, b.const(probe_every)), one)  # [B, 1] = P_b
        # no probes at all when the chunk has no visual tokens (a decode step), so it pays nothing
        most = b.op("Max", b.op("Div", chunk.visual_max, b.const(probe_every)), chunk.visual_any)
        i = b.op("Unsqueeze", b.op("Range", b.const(0), most, one), b.const([0]))  # [1, P]
        numerator = b.op(
            "Add", b.op("Mul", b.op("Mul", i, b.const(2)), b.op("Sub", lengths, one)), b.op("Sub", count, one)
        )
        denominator = b.op("Max", b.op("Mul", b.op("Sub", count, one), b.const(2)), one)
        offset = b.op(
            "Clip",
            b.op("Div", numerator, denominator),
            b.const(0),
            b.op("Max", b.op("Sub", chunk.visual_max, one), b.const(0)),
        )  # [B, P]
        columns = b.op(
            "Clip", b.op("Add", offset, chunk.visual_start), b.const(0), b.op("Sub", chunk.new, one)
        )
        valid = b.op("Cast", b.op("Less", i, count), to=ir.DataType.FLOAT)
        weight = b.op("Div", valid, b.op("Cast", count, to=ir.DataType.FLOAT))  # [B, P]
        return columns, weight


def pad_ffn(
    b: GraphBuilder,
    x: ir.Value,
    weights: Weights,
    prefix: str,
    hidden_act: str,
    chunk: Chunk,
    keep: int,
    probe_every: int,
) -> ir.Value:
    """PAD-FFN (RedundancyLens): visual tokens use only the ``keep`` channels their probes find active.

        x [B, S, d] ── text columns ───────────────────────────── full SwiGLU ──────────┐
                    └─ probes (P per row) ── act(x W_g) * (x W_u) [B, P, d_ff]            │
                         score_c = mean_p |m_pc| ── TopK(keep) ── idx [B, K]              │
                       visual columns ── x W_g[:, idx], x W_u[:, idx] ── (.) W_d[idx, :] ─┤
                                                       reassembled in column order [B, S, d]

    Only the K gathered channels are computed for visual tokens. ``keep == 0`` is the skip branch:
    visual tokens get a zero FFN output (residual only).
    """
    assert chunk.visual_start is not None and chunk.visual_max is not None and chunk.visual_any is not None
    vs, V = chunk.visual_start, chunk.visual_max
    with b.scope("pad_ffn"):
        w = FfnWeights.of(b, weights, prefix, channels_first=True)
        vend = b.op("Add", vs, V)
        x_text = b.op("Concat", b.slice(x, 0, vs, 1), b.slice(x, vend, chunk.new, 1), axis=1)  # [B, S-V, d]
        x_vis = b.slice(x, vs, vend, 1)  # [B, V, d]
        if keep == 0:
            y_text = swiglu(b, x_text, w, hidden_act)
            y_vis = b.op("Mul", x_vis, b.const(0.0, np.float32))
        else:
            # text tokens and probes share one pass through the full W_g and W_u: the weights are read
            # from memory once for both, which matters when these matrices are small in M
            columns, weight = probe_columns(b, chunk, probe_every)
            probes = b.op("GatherND", x, b.op("Unsqueeze", columns, b.const([-1])), batch_dims=1)  # [B, P, d]
            rows = b.op("Concat", x_text, probes, axis=1)
            m_all = b.op(
                "Mul", activation(b, w.project(b, rows, w.gate), hidden_act), w.project(b, rows, w.up)
            )  # [B, S-V+P, d_ff]
            text_count = b.op("Sub", chunk.new, V)
            y_text = b.op("MatMul", b.slice(m_all, 0, text_count, 1), w.down)  # [B, S-V, d]
            m = b.slice(m_all, text_count, b.op("Add", text_count, b.op("Squeeze", b.dim(probes, 1))), 1)
            # keepdims=1 then Squeeze: ORT's CUDA reductions refuse to drop an axis of size 0, and a
            # decode step has no probes
            score = b.op(
                "ReduceSum",
                b.op("Mul", b.op("Abs", m), b.op("Unsqueeze", weight, b.const([-1]))),
                b.const([1]),
                keepdims=1,
            )
            score = b.op("Squeeze", score, b.const([1]))  # [B, d_ff] = mean over each row's probes of |m|
            _, idx = b.ops(
                "TopK", score, b.const([keep]), num_outputs=2, axis=-1, largest=1, sorted=1
            )  # [B, K]
            # K stays a constant (TensorRT wants one), but without visual tokens no channel is kept:
            # a decode step would otherwise gather 3 K rows of d floats per layer for nothing
            idx = b.slice(idx, 0, b.op("Mul", b.const(keep), chunk.visual_any), 1)

            # the gathered weight rows are the left operand of the gate/up products, so the GEMM packs
            # only the (smaller) token side x^T [d, V]
            x_t = b.op("Transpose", x_vis, perm=[0, 2, 1])  # [B, d, V]
            gate = b.op("Gather", w.gate, idx, axis=0)  # [B, K, d]: whole rows, one per kept channel
            up = b.op("Gather", w.up, idx, axis=0)  # [B, K, d]
            down = b.op("Gather", w.down, idx, axis=0)  # [B, K, d]
            h_t = b.op(
                "Mul", activation(b, b.op("MatMul", gate, x_t), hidden_act), b.op("MatMul", up, x_t)
            )  # [B, K, V]
            y_vis = b.op("MatMul", b.op("Transpose", h_t, perm=[0, 2, 1]), down)  # [B, V, d]
        return b.op(
            "Concat",
            b.slice(y_text, 0, vs, 1),
            y_vis,
            b.slice(y_text, vs, b.op("Sub", chunk.new, V), 1),
            axis=1,
        )
