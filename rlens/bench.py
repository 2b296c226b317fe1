"""Prefill benchmark of the decoder graph at a real model's layer geometry, with and without reductions.

Random weights at LLaVA-1.5-7B's layer sizes need no download and time exactly like the real ones
(the FLOPs do not depend on the values). Each configuration's decoder graph is built, loaded in
ONNX Runtime, warmed up, and timed as the median of several prefills of one image prompt; the
measured time saving is set against the FLOP saving ``rlens.flops`` predicts for the same graph.
All configurations are loaded at once (4 layers of 7B geometry: about 15 GB) and timed in
interleaved rounds.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlens.flops import Geometry, prefill_flops
from rlens.graphs.builder import Weights, save
from rlens.graphs.decoder import DecoderSpec, build_decoder
from rlens.reductions import Reductions
from rlens.runtime.sessions import open_session


@dataclass(frozen=True)
class BenchGeometry:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    num_visual_tokens: int
    text_tokens: int  # system prompt, template and a short question around the image
    text_before_image: int


GEOMETRIES = {
    # LLaVA-1.5-7B: Vicuna-7B layers, ViT-L/14-336 -> 576 visual tokens; the vocabulary of llava-hf
    "llava-1.5-7b": BenchGeometry(4096, 11008, 32, 32, 32064, 576, 40, 35),
    # a small geometry for a quick run of the same code path
    "small": BenchGeometry(512, 1408, 8, 8, 8000, 144, 24, 10),
}


class RandomWeights(Weights):
    """Seeded random tensors of the right shapes, made lazily when the graph is written."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
        self._shapes = shapes
        self._seed = seed

    def names(self) -> set[str]:
        return set(self._shapes)

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _load(self, name: str) -> np.ndarray:
        rng = np.random.default_rng([self._seed, sorted(self._shapes).index(name)])
        shape = self._shapes[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)


def decoder_shapes(g: BenchGeometry, layers: int) -> dict[str, tuple[int, ...]]:
    d, ff, kv = g.hidden_size, g.intermediate_size, g.num_kv_heads * (g.hidden_size // g.num_heads)
    shapes: dict[str, tuple[int, ...]] = {"norm.weight": (d,), "lm_head.weight": (g.vocab_size, d)}
    for i in range(layers):
        p = f"layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (d, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, d),
            f"{p}.mlp.gate_proj.weight": (ff, d),
            f"{p}.mlp.up_proj.weight": (ff, d),
            f"{p}.mlp.down_proj.weight": (d, ff),
        }
    return shapes


def decoder_spec(g: BenchGeometry, layers: int) -> DecoderSpec:
    head_dim = g.hidden_size // g.num_heads
    inv_freq = tuple(float(x) for x in 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim))
    return DecoderSpec(
        num_layers=layers,
        hidden_size=g.hidden_size,
        num_heads=g.num_heads,
        num_kv_heads=g.num_kv_heads,
        head_dim=head_dim,
        intermediate_size=g.intermediate_size,
        vocab_size=g.vocab_size,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        inv_freq=inv_freq,
    )


def flop_geometry(g: BenchGeometry, layers: int) -> Geometry:
    return Geometry(
        hidden_size=g.hidden_size,
        num_layers=layers,
        num_heads=g.num_heads,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.hidden_size // g.num_heads,
        intermediate_size=g.intermediate_size,
        vocab_size=g.vocab_size,
        vision_hidden=0,
        vision_intermediate=0,
        vision_layers_run=0,
        vision_tokens=1,
        patch_pixels=0,
        num_visual_tokens=g.num_visual_tokens,
    )


@dataclass(frozen=True)
class PrefillResult:
    name: str
    hollow_layers: list[int]
    ffn_layers: list[int]
    decoder_gflops: float
    median_ms: float
    runs_ms: list[float]


def prefill_feeds(session: Any, g: BenchGeometry, reduced: bool) -> dict[str, np.ndarray]:
    """One image prompt: text before the image, the visual tokens, text after; empty KV cache."""
    n = g.num_visual_tokens + g.text_tokens
    head_dim = g.hidden_size // g.num_heads
    feeds: dict[str, np.ndarray] = {
        "inputs_embeds": np.random.default_rng(0).standard_normal((1, n, g.hidden_size), dtype=np.float32),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            feeds[inp.name] = np.zeros((1, g.num_kv_heads, 0, head_dim), np.float32)
    if reduced:
        feeds["visual_start"] = np.array(g.text_before_image, np.int64)
        feeds["visual_lengths"] = np.array([g.num_visual_tokens], np.int64)
    return feeds


def bench_decoder_prefill(
    geometry: str,
    layers: int,
    configs: dict[str, Reductions],
    runs: int = 5,
    threads: int = 0,
    log: Callable[[str], None] = print,
) -> list[PrefillResult]:
    """Median prefill time and decoder FLOPs of each named reduction config (the first is the baseline).

    All sessions are loaded first and the timed runs interleave the configurations round by round,
    so a slow minute on a shared machine slows every configuration alike instead of one of them.
    """
    g = GEOMETRIES[geometry]
    spec = decoder_spec(g, layers)
    weights = RandomWeights(decoder_shapes(g, layers))
    fg = flop_geometry(g, layers)
    tokens = g.num_visual_tokens + g.text_tokens
    times: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="rlens-bench-") as tmp:
        sessions = {}
        for name, reductions in configs.items():
            log(f"{name}: building the decoder ({layers} layers of {geometry})")
            path = Path(tmp) / f"{name}.onnx"
            save(build_decoder(spec, weights, reductions, g.num_visual_tokens), path)
            session = open_session(path, "cpu", threads=threads)
            feeds = prefill_feeds(session, g, reductions.active)
            session.run(None, feeds)  # warm-up
            sessions[name] = (session, feeds)
        for round_ in range(runs):
            log(f"round {round_ + 1}/{runs}: one prefill of {tokens} tokens per configuration")
            for name, (session, feeds) in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
        del sessions
        gc.collect()
    results = []
    for name, reductions in configs.items():
        flops = prefill_flops(fg, tokens, g.num_visual_tokens, reductions).decoder
        results.append(
            PrefillResult(
                name,
                list(reductions.hollow_layers),
                list(reductions.ffn_layers),
                flops / 1e9,
                statistics.median(times[name]),
                times[name],
            )
        )
    return results


def summary(results: list[PrefillResult]) -> list[dict[str, object]]:
    """Each config against the first: FLOP saving, time saving, and their ratio.

    The time saving is ``1 - median(t_config / t_baseline)`` over the rounds, each ratio taken within
    one round: a paired comparison that a busy moment of the machine affects much less than a ratio
    of two independent medians.
    """
    base = results[0]
    rows = []
    for r in results:
        flop_saving = 1 - r.decoder_gflops / base.decoder_gflops
        ratios = [t / t0 for t, t0 in zip(r.runs_ms, base.runs_ms, strict=True)]
        time_saving = 1 - statistics.median(ratios)
        rows.append(
            {
                **asdict(r),
                "flop_saving": flop_saving,
                "time_saving": time_saving,
                "time_over_flop_saving": time_saving / flop_saving if flop_saving > 0.01 else None,
            }
        )
    return rows
