"""FLOP accounting against the formulas of METHODS.md, worked out by hand on a small geometry."""

from __future__ import annotations

from rlens.flops import Geometry, causal_pairs, hollow_pairs_dropped, prefill_flops
from rlens.reductions import Reductions, ffn_keep_channels, probe_indices

G = Geometry(
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate_size=20,
    vocab_size=50,
    vision_hidden=6,
    vision_intermediate=12,
    vision_layers_run=1,
    vision_tokens=5,
    patch_pixels=12,
    num_visual_tokens=4,
)


def test_unreduced_layer_by_hand() -> None:
    n = 10
    projections = 2 * n * (8 * 8 + 2 * 8 * 4 + 8 * 8)  # q, k, v (kv width 4), o
    attention = 4 * (n * (n + 1) // 2) * 4 * 2
    ffn = 6 * 8 * 20 * n
    assert prefill_flops(G, n, 4).decoder == 2 * (projections + attention + ffn)
    assert prefill_flops(G, n, 4).lm_head == 2 * 8 * 50


def test_hollow_drops_only_visual_pairs_outside_the_window() -> None:
    assert hollow_pairs_dropped(4, 4) == 0 and hollow_pairs_dropped(4, 10) == 0
    # V = 6, window 2: query i keeps min(i + 1, 2) visual keys: 1+2+2+2+2+2 = 11 of 21
    assert hollow_pairs_dropped(6, 2) == causal_pairs(6) - 11 == 10
    full = prefill_flops(G, 12, 6).decoder
    hollow = prefill_flops(G, 12, 6, Reductions(hollow_layers=(1,), hollow_window=2)).decoder
    assert full - hollow == 4 * 10 * 4 * 2


def test_pad_ffn_by_hand() -> None:
    n, v = 12, 6
    r = Reductions(ffn_layers=(0,), ffn_keep=0.25, probe_every=3)
    k = ffn_keep_channels(0.25, 20)
    assert k == 5 and len(probe_indices(v, 3)) == 2
    expected_ffn = 6 * 8 * 20 * (n - v) + 6 * 8 * k * v + 4 * 8 * 20 * 2
    saving = prefill_flops(G, n, v).decoder - prefill_flops(G, n, v, r).decoder
    assert saving == 6 * 8 * 20 * n - expected_ffn
    skip = prefill_flops(G, n, v, Reductions(ffn_layers=(0,), ffn_keep=0.0)).decoder
    assert prefill_flops(G, n, v).decoder - skip == 6 * 8 * 20 * v  # no probes, no channels


def test_probe_indices_are_linspace_rounded_half_up() -> None:
    assert probe_indices(16, 10) == [0]
    assert probe_indices(576, 10)[:3] == [0, 10, 21]  # 575/56 = 10.27, 20.54
    assert probe_indices(576, 10)[-1] == 575
    assert probe_indices(576, 10)[28] == 288  # 575 * 28 / 56 = 287.5 rounds up
    assert ffn_keep_channels(0.2, 11008) == 2202 and ffn_keep_channels(1.0, 11008) == 11008
