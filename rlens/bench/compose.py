"""Full-depth figures composed from measured stage times, and the check that the composition holds.

A 32-layer LLaVA-1.5-7B does not fit a small machine in both frameworks, so the bench builds a few
layers and composes the rest. Every configuration is modelled the same way:

    time(depth) = rest + sum over the layers of time_per_layer(kind of the layer)

``rest`` is everything that does not grow with depth (preprocessing, vision tower or TRIM,
embedding, final norm and ``lm_head``, Python around the graphs), ``kind`` is ``full`` or
``reduced``; the same holds for one decode step. Where the numbers come from:

- exported pipeline: ``rest`` is the measured TTFT less the measured decoder call, plus the *head*
  probe (a decoder of no layers); a layer of each kind is ``(probe of m such layers - head) / m``.
- transformers eager: its decoder is cut to ``m`` and to 0 layers; ``rest`` is the 0-layer time and a
  layer is ``(t(m) - t(0)) / m``.

Neither model is fitted at the built depth, so comparing its prediction there with the direct
measurement (``check``) tests the composition; the figures at full depth are only as good as that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from rlens.bench.model import BenchGeometry, Config, flop_geometry, upper_half
from rlens.flops import decoder_layer_flops, prefill_flops
from rlens.precision import weight_bytes
from rlens.reductions import Reductions

CHECK_TOLERANCE = 0.05
"""Largest accepted relative difference between the composed and the measured figure at the built depth."""


@dataclass(frozen=True)
class StageModel:
    """Per-configuration times: what does not grow with depth, and what each kind of layer adds (ms)."""

    rest_prefill_ms: float
    rest_step_ms: float
    layer_prefill_ms: dict[str, float]
    layer_step_ms: dict[str, float]

    def ttft_ms(self, kinds: list[str]) -> float:
        return self.rest_prefill_ms + sum(self.layer_prefill_ms[k] for k in kinds)

    def decode_tokens_per_s(self, kinds: list[str]) -> float:
        return 1e3 / (self.rest_step_ms + sum(self.layer_step_ms[k] for k in kinds))


def step_ms(tokens_per_s: float) -> float:
    return 1e3 / tokens_per_s if tokens_per_s > 0 else 0.0


def stage_model(config: Config, measured: dict[str, Any], m: int) -> StageModel:
    """The stage model of one configuration from its measurement (``rlens.bench.measure``)."""
    if config.framework == "transformers":
        zero, probe = measured["depths"]["0"], measured["depths"][str(m)]
        zero_step, probe_step = step_ms(zero["decode_tokens_per_s"]), step_ms(probe["decode_tokens_per_s"])
        return StageModel(
            rest_prefill_ms=zero["ttft_ms"],
            rest_step_ms=zero_step,
            layer_prefill_ms={"full": (probe["ttft_ms"] - zero["ttft_ms"]) / m},
            layer_step_ms={"full": (probe_step - zero_step) / m},
        )
    stages, probes = measured["stages_ms"], measured["probes_ms"]
    head = probes["head"]
    kinds = [k for k in probes if k != "head"]
    return StageModel(
        rest_prefill_ms=measured["ttft_ms"] - stages["decoder_prefill"] + head["prefill"],
        rest_step_ms=step_ms(measured["decode_tokens_per_s"]) - stages["decoder_step"] + head["step"],
        layer_prefill_ms={k: (probes[k]["prefill"] - head["prefill"]) / m for k in kinds},
        layer_step_ms={k: (probes[k]["step"] - head["step"]) / m for k in kinds},
    )


def layer_bytes(g: BenchGeometry, precision: str = "fp32", kind: str = "full") -> float:
    """Bytes of one decoder layer's weights: its MatMuls at ``precision``, its norms in fp32.

    A ``reduced`` layer's PAD-FFN gathers the rows it keeps from the fp32 FFN weights, so a quantized
    one holds those beside their quantized copy (``rlens.graphs.quantize``).
    """
    d, kv = g.hidden_size, g.num_kv_heads * (g.hidden_size // g.num_heads)
    attention, ffn = 2 * d * d + 2 * d * kv, 3 * d * g.intermediate_size
    gathered = 4 * ffn if kind == "reduced" and precision != "fp32" else 0
    return weight_bytes(precision) * (attention + ffn) + gathered + 4 * 2 * d


def kv_bytes(g: BenchGeometry, depth: int, tokens: float) -> float:
    """fp32 bytes of the KV cache of ``tokens`` positions over ``depth`` layers."""
    return 4 * 2 * depth * g.num_kv_heads * (g.hidden_size // g.num_heads) * tokens


def decode_step_bytes(g: BenchGeometry, precision: str, depth: int, positions: float) -> float:
    """Bytes one decode step must read from memory: every layer's weights, ``lm_head``'s, and the KV
    cache of ``positions`` tokens. A reduced layer reads what a full one does here: with no visual
    token in the step, PAD-FFN gathers no rows and Hollow Attention slices nothing."""
    lm_head = weight_bytes(precision) * g.hidden_size * g.vocab_size
    return depth * layer_bytes(g, precision) + lm_head + kv_bytes(g, depth, positions)


@dataclass(frozen=True)
class Figures:
    """What the bench reports for one configuration at one depth."""

    depth: int
    ttft_ms: float
    decode_tokens_per_s: float
    prefill_gflops: float
    gflops_per_s: float
    gemm_peak_share: float
    decode_step_mb: float
    decode_gb_per_s: float
    gemv_peak_share: float
    peak_rss_mb: float
    weights_kv_mb: float

    @property
    def rss_over_weights_kv(self) -> float:
        return self.peak_rss_mb / self.weights_kv_mb

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "rss_over_weights_kv": self.rss_over_weights_kv}


def figures(
    g: BenchGeometry,
    config: Config,
    measured: dict[str, Any],
    params: Reductions,
    built: int,
    depth: int,
    ttft_ms: float,
    decode_tokens_per_s: float,
    peak_gflops: float,
    peak_gb_per_s: float,
) -> Figures:
    """FLOPs, GFLOP/s, decode GB/s and memory at ``depth`` around the given times.

    Memory at another depth than the built one moves by the weights and KV cache of the layers added:
    what the runtime holds beyond them (activations, arenas, the interpreter) does not grow with depth.
    """
    visual, prompt = measured["visual_tokens"], measured["prompt_tokens"]
    flops = prefill_flops(flop_geometry(g, depth), prompt, visual, config.reductions(depth, params)).total
    positions = prompt + len(measured["tokens"])
    precision = measured.get("precision", "fp32")  # transformers eager: fp32

    def weights(layers: int) -> float:
        return sum(layer_bytes(g, precision, kind) for kind in config.layer_kinds(layers))

    added = weights(depth) - weights(built) + kv_bytes(g, depth, positions) - kv_bytes(g, built, positions)
    weights_kv = measured["weights_mb"] * 2**20 + kv_bytes(g, built, positions) + added
    gflops_per_s = flops / ttft_ms / 1e6
    step_bytes = decode_step_bytes(g, precision, depth, prompt + len(measured["tokens"]) / 2)
    gb_per_s = step_bytes * decode_tokens_per_s / 1e9
    return Figures(
        depth=depth,
        ttft_ms=ttft_ms,
        decode_tokens_per_s=decode_tokens_per_s,
        prefill_gflops=flops / 1e9,
        gflops_per_s=gflops_per_s,
        gemm_peak_share=gflops_per_s / peak_gflops,
        decode_step_mb=step_bytes / 2**20,
        decode_gb_per_s=gb_per_s,
        gemv_peak_share=gb_per_s / peak_gb_per_s,
        peak_rss_mb=measured["peak_rss_mb"] + added / 2**20,
        weights_kv_mb=weights_kv / 2**20,
    )


def layer_figures(
    g: BenchGeometry, measured: dict[str, Any], params: Reductions, model: StageModel, peak_gflops: float
) -> dict[str, dict[str, float]]:
    """Time, FLOPs and GFLOP/s of one decoder layer of each kind in this configuration's prefill: where
    the time goes, and how close each kind of layer runs to the GEMM peak."""
    out = {}
    for kind, ms in model.layer_prefill_ms.items():
        reductions = (
            replace(params, hollow_layers=(0,), ffn_layers=(0,)) if kind == "reduced" else Reductions()
        )
        flops = decoder_layer_flops(
            flop_geometry(g, 1), measured["prompt_tokens"], measured["visual_tokens"], 0, reductions
        )
        rate = flops / ms / 1e6 if ms > 0 else 0.0
        out[kind] = {
            "prefill_ms": ms,
            "gflops": flops / 1e9,
            "gflops_per_s": rate,
            "gemm_peak_share": rate / peak_gflops,
        }
    return out


def follows_flops(
    g: BenchGeometry, measured: dict[str, Any], params: Reductions, m: int
) -> dict[str, float] | None:
    """Issue 3's test of the reductions: a decoder of ``m`` layers (the built depth) with the upper
    half reduced against the same decoder unreduced, timed alternately on this configuration's
    prefill. ``ratio`` is the time saving over the FLOP saving (1: time falls exactly as the FLOPs
    do; the target is >= 0.8)."""
    timed = measured.get("half_vs_full_ms")
    if not timed:
        return None
    geometry, tokens, visual = flop_geometry(g, m), measured["prompt_tokens"], measured["visual_tokens"]
    half = replace(params, hollow_layers=upper_half(m), ffn_layers=upper_half(m))
    full_flops, half_flops = (
        (f.decoder + f.lm_head)
        for f in (prefill_flops(geometry, tokens, visual), prefill_flops(geometry, tokens, visual, half))
    )
    full_ms, half_ms = timed["median"]["full"], timed["median"]["half"]
    time_saving, flop_saving = 1 - half_ms / full_ms, 1 - half_flops / full_flops
    return {
        "layers": m,
        "full_ms": full_ms,
        "half_ms": half_ms,
        "full_gflops": full_flops / 1e9,
        "half_gflops": half_flops / 1e9,
        "time_saving": time_saving,
        "flop_saving": flop_saving,
        "ratio": time_saving / flop_saving if flop_saving > 0 else 0.0,
    }


def compose(
    g: BenchGeometry,
    config: Config,
    measured: dict[str, Any],
    params: Reductions,
    built: int,
    m: int,
    peak_gflops: float,
    peak_gb_per_s: float,
) -> dict[str, Any]:
    """Measured figures at the built depth, the composition there (the check), and at full depth."""
    model = stage_model(config, measured, m)
    at_built = figures(
        g,
        config,
        measured,
        params,
        built,
        built,
        measured["ttft_ms"],
        measured["decode_tokens_per_s"],
        peak_gflops,
        peak_gb_per_s,
    )
    kinds = config.layer_kinds(built)
    composed_ttft, composed_decode = model.ttft_ms(kinds), model.decode_tokens_per_s(kinds)
    ttft_error = composed_ttft / measured["ttft_ms"] - 1
    decode_error = composed_decode / measured["decode_tokens_per_s"] - 1 if measured["tokens"][1:] else 0.0
    full_kinds = config.layer_kinds(g.full_layers)
    full = figures(
        g,
        config,
        measured,
        params,
        built,
        g.full_layers,
        model.ttft_ms(full_kinds),
        model.decode_tokens_per_s(full_kinds),
        peak_gflops,
        peak_gb_per_s,
    )
    return {
        "measured": at_built.to_dict(),
        "stages": asdict(model),
        "layers": layer_figures(g, measured, params, model, peak_gflops),
        "check": {
            "depth": built,
            "ttft_ms": {"measured": measured["ttft_ms"], "composed": composed_ttft, "error": ttft_error},
            "decode_tokens_per_s": {
                "measured": measured["decode_tokens_per_s"],
                "composed": composed_decode,
                "error": decode_error,
            },
            "within_tolerance": abs(ttft_error) <= CHECK_TOLERANCE and abs(decode_error) <= CHECK_TOLERANCE,
        },
        "full_depth": full.to_dict(),
        "follows_flops": follows_flops(g, measured, params, built),
    }
