"""Rotary embeddings, attention masks and grouped-query attention.

Shapes in comments: B batch, S new tokens, P past tokens, T = P + S, H query heads, G kv heads,
R = H / G queries per kv head, D head dim.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rlens.graphs.builder import FLOAT, GraphBuilder

MASKED = float(np.finfo(np.float32).min)
"""Score of a masked pair: finite, so a fully masked (padding) row softmaxes to a uniform row, not NaN."""


def rotary_tables(
    b: GraphBuilder, position_ids: ir.Value, inv_freq: np.ndarray, scaling: float
) -> tuple[ir.Value, ir.Value]:
    """``cos`` and ``sin`` of ``position * inv_freq`` for every head, ``[B, 1, S, D]``.

    ``inv_freq`` and ``scaling`` come from transformers' rope initialisation at export time, so
    every rope type it computes statically (default, linear, llama3, yarn, ...) is covered.
    """
    with b.scope("rotary"):
        pos = b.op("Cast", b.op("Unsqueeze", position_ids, b.const([-1])), to=FLOAT)  # [B, S, 1]
        freqs = b.op("Mul", pos, b.const(inv_freq, np.float32))  # [B, S, D/2]
        angles = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.const([1]))  # [B, 1, S, D]
        cos, sin = b.op("Cos", angles), b.op("Sin", angles)
        if scaling != 1.0:
            cos = b.op("Mul", cos, b.const(scaling, np.float32))
            sin = b.op("Mul", sin, b.const(scaling, np.float32))
        return cos, sin


def apply_rotary(b: GraphBuilder, x: ir.Value, cos: ir.Value, sin: ir.Value, head_dim: int) -> ir.Value:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``; x is [B, H, S, D]."""
    half = head_dim // 2
    x1 = b.op("Slice", x, b.const([0]), b.const([half]), b.const([-1]))
    x2 = b.op("Slice", x, b.const([half]), b.const([head_dim]), b.const([-1]))
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def causal_mask(
    b: GraphBuilder, attention_mask: ir.Value, new_tokens: ir.Value, sliding_window: int | None = None
) -> ir.Value:
    """Which key each query may see, ``[B, 1, 1, S, T]`` bool.

    Query ``i`` of the chunk sits at cache index ``P + i``; it sees key ``j`` when ``j <= P + i``,
    the key is not padding (``attention_mask[b, j] == 1``), and, with a sliding window ``W``,
    ``j > P + i - W`` (transformers' convention).
    """
    with b.scope("mask"):
        total = b.dim(attention_mask, 1)  # [1] = T
        past = b.op("Sub", total, new_tokens)  # [1] = P
        zero, one = b.const(0), b.const(1)
        q_pos = b.op(
            "Unsqueeze", b.op("Range", b.op("Squeeze", past), b.op("Squeeze", total), one), b.const([-1])
        )  # [S, 1]
        k_pos = b.op("Unsqueeze", b.op("Range", zero, b.op("Squeeze", total), one), b.const([0]))  # [1, T]
        visible = b.op("LessOrEqual", k_pos, q_pos)  # [S, T]
        if sliding_window is not None:
            window_start = b.op("Sub", q_pos, b.const(sliding_window))
            visible = b.op("And", visible, b.op("Greater", k_pos, window_start))
        not_padding = b.op("Cast", b.op("Unsqueeze", attention_mask, b.const([1, 2, 3])), to=ir.DataType.BOOL)
        return b.op("And", b.op("Unsqueeze", visible, b.const([0, 1, 2])), not_padding)  # [B, 1, 1, S, T]


def attention(
    b: GraphBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    mask: ir.Value | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> ir.Value:
    """``softmax(q k^T / sqrt(D) | mask) v`` with grouped kv heads; q [B, H, S, D], k/v [B, G, T, D].

    ``mask`` (``[B, 1, 1, S, T]``, True = visible) may be None: every query sees every key.
    Query heads are grouped as ``[B, G, R, S, D]`` and multiplied against ``[B, G, 1, T, D]`` keys by
    broadcasting, so the kv heads are never repeated in memory.
    """
    with b.scope("sdpa"):
        q = b.op("Mul", q, b.const(head_dim**-0.5, np.float32))
        group = num_heads // num_kv_heads
        q = b.op("Reshape", q, b.shape_of(0, num_kv_heads, group, b.dim(q, 2), head_dim))  # [B, G, R, S, D]
        k = b.op("Unsqueeze", k, b.const([2]))  # [B, G, 1, T, D]
        v = b.op("Unsqueeze", v, b.const([2]))
        scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 2, 4, 3]))  # [B, G, R, S, T]
        if mask is not None:
            scores = b.op("Where", mask, scores, b.const(MASKED, np.float32))
        probs = b.op("Softmax", scores, axis=-1)
        out = b.op("MatMul", probs, v)  # [B, G, R, S, D]
        return b.op("Reshape", out, b.const([0, num_heads, -1, head_dim]))  # [B, H, S, D]
