"""The decoder graph: one graph for prefill and decode steps, with a KV cache.

IO follows onnxruntime-genai's names (METHODS.md, "Graph and IO conventions")::

    inputs_embeds [B, S, d]   attention_mask [B, P+S] int64   position_ids [B, S] int64
    past_key_values.{i}.key|value [B, G, P, D]
      -> logits [B, 1, vocab]   present.{i}.key|value [B, G, P+S, D]

Only the last position's logits are computed: that is all greedy or sampled generation needs,
and it keeps a prefill of hundreds of visual tokens from paying for a [S, vocab] product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rlens.graphs.attention import (
    Chunk,
    apply_rotary,
    attention,
    causal_mask,
    chunk_of,
    hollow_attention,
    rotary_tables,
)
from rlens.graphs.builder import BOOL, FLOAT, INT64, GraphBuilder, Weights
from rlens.graphs.ffn import pad_ffn, swiglu_ffn
from rlens.graphs.layers import linear, rms_norm
from rlens.reductions import Reductions, ffn_keep_channels

HOLLOW_BLOCK = 64
"""Visual queries per block in hollow layers: small enough that a window wastes little on block edges."""


@dataclass(frozen=True)
class DecoderSpec:
    """Geometry of a LLaMA-family decoder (LLaMA, Mistral, Qwen2), as the graph needs it."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    inv_freq: tuple[float, ...]
    rope_attention_scaling: float = 1.0
    sliding_windows: tuple[int | None, ...] = ()
    """Per layer: the sliding attention window, or None for full attention. Empty means all full."""

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


@dataclass(frozen=True)
class Context:
    """What every layer reads besides its own weights: computed once at the top of the graph."""

    chunk: Chunk
    rotary: tuple[ir.Value, ir.Value]
    masks: dict[int | None, ir.Value]  # sliding window (None: full) -> causal mask
    reductions: Reductions
    max_visual: int


def self_attention(
    b: GraphBuilder,
    x: ir.Value,
    weights: Weights,
    prefix: str,
    spec: DecoderSpec,
    layer: int,
    ctx: Context,
    past: tuple[ir.Value, ir.Value],
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Q/K/V projections, RoPE, the KV cache append, (hollow) attention and the output projection.

    Returns the attention output [B, S, d] and the present key and value [B, G, P+S, D].
    """
    H, G, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    with b.scope("attn"):

        def heads(name: str, n: int) -> ir.Value:  # [B, S, n*D] -> [B, n, S, D]
            y = linear(b, x, weights, f"{prefix}.{name}")
            return b.op("Transpose", b.op("Reshape", y, b.const([0, 0, n, D])), perm=[0, 2, 1, 3])

        cos, sin = ctx.rotary
        q = apply_rotary(b, heads("q_proj", H), cos, sin, D)
        k = apply_rotary(b, heads("k_proj", G), cos, sin, D)
        v = heads("v_proj", G)
        k = b.op("Concat", past[0], k, axis=2)  # [B, G, P+S, D]
        v = b.op("Concat", past[1], v, axis=2)
        window = ctx.reductions.hollow_window
        if ctx.reductions.is_hollow(layer):
            out = hollow_attention(
                b,
                q,
                k,
                v,
                ctx.chunk,
                (H, G, D),
                window,
                min(window, HOLLOW_BLOCK),
                ctx.max_visual,
                spec.window(layer),
            )
        else:
            out = attention(b, q, k, v, ctx.masks[spec.window(layer)], H, G, D)  # [B, H, S, D]
        out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.const([0, 0, H * D]))
        return linear(b, out, weights, f"{prefix}.o_proj"), k, v


def decoder_layer(
    b: GraphBuilder,
    x: ir.Value,
    weights: Weights,
    i: int,
    spec: DecoderSpec,
    ctx: Context,
    past: tuple[ir.Value, ir.Value],
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Pre-norm residual block: ``x += attn(norm(x)); x += ffn(norm(x))``."""
    prefix = f"layers.{i}"
    with b.scope(prefix):
        h = rms_norm(b, x, weights.get(f"{prefix}.input_layernorm.weight"), spec.rms_norm_eps)
        attn_out, present_k, present_v = self_attention(
            b, h, weights, f"{prefix}.self_attn", spec, i, ctx, past
        )
        x = b.op("Add", x, attn_out)
        h = rms_norm(b, x, weights.get(f"{prefix}.post_attention_layernorm.weight"), spec.rms_norm_eps)
        r = ctx.reductions
        if r.is_pad_ffn(i):
            keep = ffn_keep_channels(r.ffn_keep, spec.intermediate_size)
            ffn = pad_ffn(b, h, weights, f"{prefix}.mlp", spec.hidden_act, ctx.chunk, keep, r.probe_every)
        else:
            ffn = swiglu_ffn(b, h, weights, f"{prefix}.mlp", spec.hidden_act)
        return b.op("Add", x, ffn), present_k, present_v


def build_decoder(
    spec: DecoderSpec,
    weights: Weights,
    reductions: Reductions | None = None,
    max_visual: int = 0,
    span_from_shape: bool = False,
) -> ir.Model:
    """The whole decoder: embeddings in, last-position logits and the updated KV cache out.

    ``weights`` holds the language model's tensors under transformers' names relative to the
    decoder (``layers.0.self_attn.q_proj.weight``, ``norm.weight``) plus ``lm_head.weight``.
    With ``reductions``, the graph also takes the visual span of the chunk (``visual_start`` [],
    ``visual_lengths`` [B]); ``max_visual`` is the most visual tokens one chunk can carry. With
    ``span_from_shape`` (the TensorRT track) the start column and the span's width are the shape of
    an input ``visual_span`` [visual_start, visual_width] whose values are never read: TensorRT knows
    every size from input shapes, and needs no shape-tensor input.
    """
    reductions = reductions or Reductions()
    reductions.check_layers(spec.num_layers)
    b = GraphBuilder("model")
    G, D = spec.num_kv_heads, spec.head_dim
    x = b.input("inputs_embeds", FLOAT, ["batch", "sequence", spec.hidden_size])
    attention_mask = b.input("attention_mask", INT64, ["batch", "total_sequence"])
    position_ids = b.input("position_ids", INT64, ["batch", "sequence"])
    past = [
        (
            b.input(f"past_key_values.{i}.key", FLOAT, ["batch", G, "past_sequence", D]),
            b.input(f"past_key_values.{i}.value", FLOAT, ["batch", G, "past_sequence", D]),
        )
        for i in range(spec.num_layers)
    ]
    span: tuple[ir.Value, ir.Value] | tuple[None, None] = (None, None)
    width = None
    if reductions.active and span_from_shape:
        marker = b.input("visual_span", BOOL, ["visual_start", "visual_width"])
        start, width = (b.op("Squeeze", b.dim(marker, axis)) for axis in (0, 1))
        span = (start, b.input("visual_lengths", INT64, ["batch"]))
    elif reductions.active:
        span = (b.input("visual_start", INT64, []), b.input("visual_lengths", INT64, ["batch"]))

    chunk = chunk_of(b, x, attention_mask, *span, visual_width=width)
    windows = sorted({spec.window(i) for i in range(spec.num_layers)}, key=lambda w: w or 0)
    ctx = Context(
        chunk=chunk,
        rotary=rotary_tables(
            b, position_ids, np.asarray(spec.inv_freq, np.float32), spec.rope_attention_scaling
        ),
        masks={w: causal_mask(b, chunk, w) for w in windows},
        reductions=reductions,
        max_visual=max_visual,
    )

    presents = []
    for i in range(spec.num_layers):
        x, present_k, present_v = decoder_layer(b, x, weights, i, spec, ctx, past[i])
        presents.append((present_k, present_v))

    with b.scope("final"):
        last = b.op("Slice", x, b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([1]))  # [B, 1, d]
        logits = linear(
            b, rms_norm(b, last, weights.get("norm.weight"), spec.rms_norm_eps), weights, "lm_head"
        )
    b.output(logits, "logits", FLOAT, ["batch", 1, spec.vocab_size])
    for i, (k, v) in enumerate(presents):
        b.output(k, f"present.{i}.key", FLOAT, ["batch", G, "total_sequence", D])
        b.output(v, f"present.{i}.value", FLOAT, ["batch", G, "total_sequence", D])
    return b.build("rlens decoder: inputs_embeds + KV cache -> last-position logits + present KV cache")
