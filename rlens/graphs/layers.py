"""The small blocks every graph is made of: linear layers, norms and activations.

Each function takes the builder, the input value and the weights it needs, and returns the output
value; the body reads like the formula it implements. Everything is computed in float32.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from rlens.graphs.builder import GraphBuilder, Weights


def linear(b: GraphBuilder, x: ir.Value, weights: Weights, prefix: str) -> ir.Value:
    """``x @ W^T + bias`` for a PyTorch ``Linear`` stored under ``prefix`` (bias optional)."""
    y = b.op("MatMul", x, b.weight(weights.get(f"{prefix}.weight", transpose=True)))
    if f"{prefix}.bias" in weights:
        y = b.op("Add", y, b.weight(weights.get(f"{prefix}.bias")))
    return y


def rms_norm(b: GraphBuilder, x: ir.Value, weight: ir.TensorProtocol, eps: float) -> ir.Value:
    """RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last axis.

    Written as Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul, the form ONNX Runtime's optimizer
    fuses into one ``SimplifiedLayerNormalization`` kernel (one pass instead of six).
    """
    with b.scope("rms_norm"):
        mean_square = b.op("ReduceMean", b.op("Pow", x, b.const(2.0, np.float32)), b.const([-1]), keepdims=1)
        rms = b.op("Sqrt", b.op("Add", mean_square, b.const(eps, np.float32)))
        return b.op("Mul", b.op("Div", x, rms), b.weight(weight))


def layer_norm(b: GraphBuilder, x: ir.Value, weights: Weights, prefix: str, eps: float) -> ir.Value:
    """LayerNorm over the last axis (``prefix.weight``, ``prefix.bias``)."""
    return b.op(
        "LayerNormalization",
        x,
        b.weight(weights.get(f"{prefix}.weight")),
        b.weight(weights.get(f"{prefix}.bias")),
        axis=-1,
        epsilon=eps,
    )


def silu(b: GraphBuilder, x: ir.Value) -> ir.Value:
    """``x * sigmoid(x)`` (SwiGLU's gate)."""
    return b.op("Mul", x, b.op("Sigmoid", x))


def gelu(b: GraphBuilder, x: ir.Value) -> ir.Value:
    """Exact GELU, ``x/2 * (1 + erf(x / sqrt 2))``, written with ``Erf`` so every backend takes it."""
    erf = b.op("Erf", b.op("Mul", x, b.const(1 / math.sqrt(2), np.float32)))
    return b.op("Mul", b.op("Mul", x, b.const(0.5, np.float32)), b.op("Add", erf, b.const(1.0, np.float32)))


def gelu_tanh(b: GraphBuilder, x: ir.Value) -> ir.Value:
    """The tanh approximation of GELU (``gelu_new``, ``gelu_pytorch_tanh``)."""
    cube = b.op("Mul", b.op("Mul", x, x), x)
    inner = b.op(
        "Mul",
        b.op("Add", x, b.op("Mul", cube, b.const(0.044715, np.float32))),
        b.const(math.sqrt(2 / math.pi), np.float32),
    )
    return b.op(
        "Mul",
        b.op("Mul", x, b.const(0.5, np.float32)),
        b.op("Add", b.op("Tanh", inner), b.const(1.0, np.float32)),
    )


def quick_gelu(b: GraphBuilder, x: ir.Value) -> ir.Value:
    """``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP."""
    return b.op("Mul", x, b.op("Sigmoid", b.op("Mul", x, b.const(1.702, np.float32))))


ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
}


def activation(b: GraphBuilder, x: ir.Value, name: str) -> ir.Value:
    """The activation transformers calls ``name`` (``ACT2FN``); unknown names are refused."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name](b, x)
