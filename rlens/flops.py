"""Prefill FLOPs of a pipeline, with and without the reductions (formulas: METHODS.md, "FLOP accounting").

Counts multiply-adds as 2 FLOPs. Per decoder layer, for a prefill of N tokens of which V are visual:
projections ``2 N (d q + 2 d d_kv + q d)`` (q = heads * head_dim), attention ``4 pairs head_dim heads``,
FFN ``6 d d_ff`` per token. A hollow layer drops the visual->visual pairs outside its window; a PAD-FFN
layer gives each visual token ``6 d K`` plus ``4 d d_ff`` per probe. The vision tower, the projector and
the last-position ``lm_head`` are counted too: they are unchanged by the decoder reductions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rlens.reductions import Reductions, ffn_keep_channels, num_probes


@dataclass(frozen=True)
class Geometry:
    """What the FLOP count needs to know about a LLaVA pipeline."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers_run: int
    vision_tokens: int  # patches + CLS
    patch_pixels: int  # 3 * patch * patch
    num_visual_tokens: int


@dataclass(frozen=True)
class PrefillFlops:
    vision: int
    decoder: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.vision + self.decoder + self.lm_head

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def hollow_pairs_dropped(visual: int, window: int) -> int:
    """Visual->visual pairs of full causal attention that a window of ``window`` leaves out."""
    if visual <= window:
        return 0
    kept = causal_pairs(window) + (visual - window) * window
    return causal_pairs(visual) - kept


def decoder_layer_flops(g: Geometry, tokens: int, visual: int, layer: int, r: Reductions) -> int:
    d, q_width, kv_width = g.hidden_size, g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    projections = 2 * tokens * (d * q_width + 2 * d * kv_width + q_width * d)
    pairs = causal_pairs(tokens)
    if r.is_hollow(layer):
        pairs -= hollow_pairs_dropped(visual, r.hollow_window)
    attention = 4 * pairs * g.head_dim * g.num_heads
    ffn = 6 * d * g.intermediate_size * tokens
    if r.is_pad_ffn(layer) and visual:
        keep = ffn_keep_channels(r.ffn_keep, g.intermediate_size)
        probes = num_probes(visual, r.probe_every) if keep else 0
        ffn = 6 * d * g.intermediate_size * (tokens - visual) + 6 * d * keep * visual
        ffn += 4 * d * g.intermediate_size * probes
    return projections + attention + ffn


def vision_flops(g: Geometry) -> int:
    n, dv = g.vision_tokens, g.vision_hidden
    per_layer = 2 * n * 4 * dv * dv + 4 * n * n * dv + 2 * n * 2 * dv * g.vision_intermediate
    patches = 2 * (n - 1) * g.patch_pixels * dv
    projector = 2 * g.num_visual_tokens * (dv * g.hidden_size + g.hidden_size * g.hidden_size)
    return patches + g.vision_layers_run * per_layer + projector


def prefill_flops(
    g: Geometry, tokens: int, visual: int, reductions: Reductions | None = None
) -> PrefillFlops:
    """FLOPs of one prefill of ``tokens`` tokens (``visual`` of them visual) through the whole pipeline."""
    r = reductions or Reductions()
    decoder = sum(decoder_layer_flops(g, tokens, visual, i, r) for i in range(g.num_layers))
    return PrefillFlops(
        vision=vision_flops(g) if visual else 0, decoder=decoder, lm_head=2 * g.hidden_size * g.vocab_size
    )
