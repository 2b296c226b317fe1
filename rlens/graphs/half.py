"""``--precision fp16``: the decoder in half precision, with the two computations that need float32 in it.

    inputs_embeds (float32) --Cast--> float16 -> decoder layers in float16 -> logits --Cast--> float32
    past_key_values.* / present.*: float16 (half the KV cache's bytes, read every decode step)
    float32 islands, entered and left through Casts:
      rms_norm  mean(x^2) overflows float16 once |x| > 256 (65504 is its largest value), and LLaMA's
                hidden states have outliers beyond that
      rotary    position * inverse frequency: above position 2048 float16's spacing is 2, so the
                angle would be off by radians
    the mask bias: ``MASKED`` (float32's lowest) becomes ``MASKED_FP16``

transformers runs LLaMA in float16 the same way: ``LlamaRMSNorm`` computes in float32 and casts back,
the rotary embedding computes cos/sin in float32 and casts them to the activations' type
(``transformers/models/llama/modeling_llama.py``). Everything else (weights, activations, attention
scores, softmax, PAD-FFN's probe scores, Hollow Attention's block products) runs in float16: the
arithmetic GPUs' tensor cores do at twice TF32's rate and TensorRT's strongly typed networks take
from the graph (``rlens.tensorrt.engines``).

A pass over the built graph, like ``rlens.graphs.quantize``: the graph functions stay one set, written
in float32, and this rewrites types. Which nodes are islands is read from their scope in the node
name (``/model/layers.3/rms_norm/Pow``), so the islands are the functions
``rms_norm`` and ``rotary_tables`` whatever calls them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from rlens.errors import RlensError
from rlens.graphs.attention import MASKED

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16

FP32_ISLANDS = ("/rms_norm/", "/rotary/")
"""Scopes whose nodes stay float32 (see the module docstring)."""

MASKED_FP16 = -30000.0
"""``MASKED`` in float16: finite, and ``score + MASKED_FP16`` stays finite for any score under 35504.

float16's lowest value (-65504) would not do: adding a score below about -16 overflows it to -inf,
a row of padding whose keys are all masked then softmaxes to NaN, and ``0 * NaN`` in ``probs @ V``
carries the NaN into every row that reads that position's values."""

CACHE_PREFIXES = ("past_key_values.", "present.")

UNHANDLED = ("Constant", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike")
"""Ops that make float32 from attributes this pass does not rewrite; rlens's builders use none of them
(constants are initializers), so meeting one means a graph function changed."""


def in_island(node: ir.Node) -> bool:
    return any(scope in (node.name or "") for scope in FP32_ISLANDS)


class HalfPrecision(ir.passes.InPlacePass):
    """The float32 graph -> float16 graph with float32 islands, float32 ``inputs_embeds`` and logits."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        ShapeInferencePass(strict_mode=False, data_prop=False)(model)  # the type of every value
        untyped = [v.name for node in graph for v in node.outputs if v.dtype is None]
        if untyped:  # the pass leaves the model unchanged when inference fails
            raise RlensError(
                f"--precision fp16 needs every value's type and ONNX shape inference gave none for "
                f"{', '.join(map(str, untyped[:3]))}; export with --precision fp32"
            )
        self._casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self.island_copies: dict[ir.Value, ir.Value] = {}
        self._cast_at_island_borders(graph)
        self._cast_float_inputs(graph)  # after: an island reading inputs_embeds reads it through both casts
        self._retype(graph)
        self._cast_float_outputs(graph)
        for node in graph:  # inferred float32 types are stale now; ORT infers them again on load
            for value in node.outputs:
                if not value.is_graph_output():
                    value.type, value.shape = None, None
        return ir.passes.PassResult(model, True)

    # -- interface ------------------------------------------------------------------------------
    def _cast_float_inputs(self, graph: ir.Graph) -> None:
        """The KV cache comes in as float16; ``inputs_embeds`` stays float32 and is cast once inside."""
        for value in graph.inputs:
            if value.dtype != FLOAT:
                continue
            if value.name is not None and value.name.startswith(CACHE_PREFIXES):
                value.dtype = FLOAT16
                continue
            uses = list(value.uses())
            half = self._cast(graph, value, FLOAT16)
            for use in uses:
                use.node.replace_input_with(use.idx, half)

    def _cast_float_outputs(self, graph: ir.Graph) -> None:
        """``present.*`` leave as float16; the logits go back to float32 for the sampler."""
        for i, value in enumerate(graph.outputs):
            if value.name is not None and value.name.startswith(CACHE_PREFIXES):
                value.dtype = FLOAT16
            elif value.dtype == FLOAT:
                name, value.name = value.name, f"{value.name}.fp16"
                value.dtype = FLOAT16
                cast = ir.node("Cast", [value], {"to": FLOAT}, name=f"/output/{name}/Cast")
                graph.append(cast)
                out = cast.outputs[0]
                out.name, out.dtype, out.shape = name, FLOAT, value.shape
                graph.outputs[i] = out

    # -- islands --------------------------------------------------------------------------------
    def _cast_at_island_borders(self, graph: ir.Graph) -> None:
        """Cast float values into an island to float32 and out of one to float16.

        An island's float initializers stay float32 as they are; one that nodes outside also read
        gets a float32 copy for the island, since the original becomes float16.
        """
        for node in list(graph):
            inside = in_island(node)
            for i, value in enumerate(node.inputs):
                if value is None or value.dtype != FLOAT:
                    continue
                producer = value.producer()
                if inside and value.is_initializer():
                    if any(not in_island(use.node) for use in value.uses()):
                        node.replace_input_with(i, self._island_copy(graph, value))
                elif inside and (producer is None or not in_island(producer)):
                    node.replace_input_with(i, self._cast(graph, value, FLOAT))
                elif not inside and producer is not None and in_island(producer):
                    node.replace_input_with(i, self._cast(graph, value, FLOAT16))

    def _island_copy(self, graph: ir.Graph, value: ir.Value) -> ir.Value:
        if value not in self.island_copies:
            assert value.const_value is not None and value.name is not None
            copy = ir.Value(
                name=f"{value.name}.fp32",
                shape=value.shape,
                type=ir.TensorType(FLOAT),
                const_value=ir.Tensor(value.const_value.numpy(), name=f"{value.name}.fp32"),
            )
            graph.register_initializer(copy)
            self.island_copies[value] = copy
        return self.island_copies[value]

    def _cast(self, graph: ir.Graph, value: ir.Value, to: ir.DataType) -> ir.Value:
        """``Cast(value, to)``, one per value and type, placed right after the value is available."""
        key = (value, to)
        if key not in self._casts:
            cast = ir.node("Cast", [value], {"to": to}, name=f"/cast_{to.name.lower()}/{value.name}")
            producer = value.producer()
            if producer is not None:
                graph.insert_after(producer, cast)
            else:  # a graph input: first of all
                graph.insert_before(next(iter(graph)), cast)
            cast.outputs[0].name = f"{value.name}.{to.name.lower()}"
            cast.outputs[0].dtype = to
            self._casts[key] = cast.outputs[0]
        return self._casts[key]

    # -- everything outside the islands ---------------------------------------------------------
    def _retype(self, graph: ir.Graph) -> None:
        """Float initializers read outside the islands become float16; so do Casts to float there."""
        for value in list(graph.initializers.values()):
            if value.dtype != FLOAT or value in self.island_copies.values():
                continue
            if all(in_island(use.node) for use in value.uses()):
                continue
            tensor = value.const_value
            assert tensor is not None
            value.const_value = _half(tensor)
            value.dtype = FLOAT16
        for node in graph:
            if in_island(node) or node.name is None or node.name.startswith(("/cast_", "/output/")):
                continue
            default_fill = node.op_type == "ConstantOfShape" and "value" not in node.attributes  # float32 0
            if node.op_type in UNHANDLED or default_fill:
                raise RlensError(
                    f"--precision fp16 does not convert {node.op_type} nodes ({node.name}); export with fp32"
                )
            to = node.attributes.get("to")
            if node.op_type == "Cast" and to is not None and to.as_int() == FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", FLOAT16)
            if node.op_type == "ConstantOfShape" and "value" in node.attributes:
                fill = node.attributes["value"].as_tensor()
                if fill.dtype == FLOAT:
                    node.attributes["value"] = ir.AttrTensor("value", _half(fill))


def _half(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """A float32 tensor in float16: ``MASKED`` becomes ``MASKED_FP16``, and a value beyond float16's
    range is refused rather than written as infinity. Big tensors (weights) convert when written."""
    name = tensor.name

    def convert() -> ir.TensorProtocol:
        array = tensor.numpy()
        array = np.where(array == MASKED, MASKED_FP16, array)
        largest = float(np.abs(array).max(initial=0.0))
        if not largest <= np.finfo(np.float16).max:
            raise RlensError(
                f"'{name}' holds {largest:g}, beyond float16's range (65504); export with --precision fp32"
            )
        return ir.Tensor(array.astype(np.float16), name=name)

    if tensor.size > 4096:  # a weight: one at a time as the graph is saved, never all at once
        return ir.LazyTensor(convert, dtype=FLOAT16, shape=tensor.shape, name=name)
    return convert()


def to_half(model: ir.Model) -> ir.Model:
    """``model`` with float16 weights, activations and KV cache (in place; returned)."""
    return HalfPrecision()(model).model
