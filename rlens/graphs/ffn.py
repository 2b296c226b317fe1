"""The decoder's feed-forward block."""

from __future__ import annotations

import onnx_ir as ir

from rlens.graphs.builder import GraphBuilder, Weights
from rlens.graphs.layers import activation, linear


def swiglu_ffn(b: GraphBuilder, x: ir.Value, weights: Weights, prefix: str, hidden_act: str) -> ir.Value:
    """``down(act(gate(x)) * up(x))``: the gated FFN of LLaMA, Mistral and Qwen2."""
    with b.scope("mlp"):
        gate = activation(b, linear(b, x, weights, f"{prefix}.gate_proj"), hidden_act)
        return linear(
            b, b.op("Mul", gate, linear(b, x, weights, f"{prefix}.up_proj")), weights, f"{prefix}.down_proj"
        )
