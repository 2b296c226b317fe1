"""``rlens bench`` on the small geometry: every configuration measured, compared and written out.

The bench runs once for the module (about 30 s: a random LLaVA, four exports, five measurement
processes). Timings on a shared test machine are noise, so nothing here asserts a speed; what is
asserted is what the bench must get right whatever the timings: the same greedy tokens from
transformers and the unreduced pipeline, fewer visual tokens with TRIM, FLOPs from ``rlens.flops``,
the composition arithmetic, and the files.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from rlens.bench import CONFIGS, GEOMETRIES
from rlens.bench.compose import compose, stage_model
from rlens.bench.model import Config, flop_geometry
from rlens.bench.report import FOLLOWS_TARGET, TARGETS, with_ratios
from rlens.cli.main import main as rlens_main
from rlens.flops import prefill_flops
from rlens.reductions import Reductions

SMALL = GEOMETRIES["small"]
LAYERS = 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--geometry", "small", "--layers", str(LAYERS), "--runs", "1", "--new-tokens", "4"]
    args += ["--hollow-window", "16", "-o", str(out), "--json"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert rlens_main(args) == 0
    return json.loads(stdout.getvalue()), out


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["configs"]}


def test_every_configuration_is_measured(bench: tuple[dict[str, Any], Path]) -> None:
    report, _ = bench
    assert [c["name"] for c in report["configs"]] == [c.name for c in CONFIGS]
    for c in report["configs"]:
        for depth in ("measured", "full_depth"):
            figures = c[depth]
            for key in ("ttft_ms", "decode_tokens_per_s", "prefill_gflops", "gflops_per_s", "peak_rss_mb"):
                assert math.isfinite(figures[key]), (c["name"], depth, key)
            assert figures["peak_rss_mb"] > 0 and figures["weights_kv_mb"] > 0
        assert c["measured"]["depth"] == LAYERS and c["full_depth"]["depth"] == SMALL.full_layers
    assert report["gemm_peak"]["gflops_per_s"] > 0 and report["gemv_peak"]["gb_per_s"] > 0
    for c in report["configs"]:
        assert c["full_depth"]["decode_gb_per_s"] > 0 and c["full_depth"]["decode_roofline_vs_eager"] > 0
    follows = {f"hollow+pad-ffn: {FOLLOWS_TARGET}"}  # the target is for all visual tokens
    assert {t["target"] for t in report["targets"]} == {t[-1] for t in TARGETS} | follows


REDUCED = ("hollow+pad-ffn", "trim+hollow+pad-ffn")


def test_half_reduced_decoder_is_timed_against_the_full_one(bench: tuple[dict[str, Any], Path]) -> None:
    """Issue 3's figure: alternating rounds of the probe decoder with half its layers reduced against
    it unreduced, the saving ratio computed from those times and ``rlens.flops``."""
    configs = by_name(bench[0])
    for name, c in configs.items():
        f = c["follows_flops"]
        if name not in REDUCED:
            assert f is None, name
            continue
        rounds = c["raw"]["half_vs_full_ms"]["rounds"]
        assert len(rounds["full"]) == len(rounds["half"]) >= 7
        assert f["full_ms"] == pytest.approx(sorted(rounds["full"])[len(rounds["full"]) // 2])
        m, tokens, visual = f["layers"], c["prompt_tokens"], c["visual_tokens"]
        assert m == LAYERS
        upper = tuple(range(m // 2, m))
        half = Reductions(**{**bench[0]["reductions"], "hollow_layers": upper, "ffn_layers": upper})
        full_flops, half_flops = (
            x.decoder + x.lm_head
            for x in (
                prefill_flops(flop_geometry(SMALL, m), tokens, visual),
                prefill_flops(flop_geometry(SMALL, m), tokens, visual, half),
            )
        )
        assert f["flop_saving"] == pytest.approx(1 - half_flops / full_flops) and f["flop_saving"] > 0
        assert f["ratio"] == pytest.approx((1 - f["half_ms"] / f["full_ms"]) / f["flop_saving"])
    assert "Does the prefill time follow the FLOPs?" in (bench[1] / "bench.md").read_text()


def test_eager_and_unreduced_pipeline_generate_the_same_tokens(bench: tuple[dict[str, Any], Path]) -> None:
    configs = by_name(bench[0])
    eager, unreduced = configs["transformers-eager"], configs["unreduced"]
    assert eager["tokens"] == unreduced["tokens"] and len(eager["tokens"]) >= 2
    assert eager["prompt_tokens"] == unreduced["prompt_tokens"]
    assert eager["visual_tokens"] == unreduced["visual_tokens"] == SMALL.num_visual_tokens


def test_trim_keeps_fewer_visual_tokens_and_reductions_cut_flops(bench: tuple[dict[str, Any], Path]) -> None:
    configs = by_name(bench[0])
    full = configs["unreduced"]
    kept = round(0.21 * SMALL.num_visual_tokens) + 1  # ratio:0.21, plus the mean of the rest
    assert configs["trim"]["visual_tokens"] == configs["trim+hollow+pad-ffn"]["visual_tokens"] == kept
    assert configs["hollow+pad-ffn"]["hollow_layers"] == configs["hollow+pad-ffn"]["ffn_layers"] == [1]
    expected = prefill_flops(flop_geometry(SMALL, LAYERS), full["prompt_tokens"], full["visual_tokens"])
    assert full["measured"]["prefill_gflops"] == pytest.approx(expected.total / 1e9)
    for name in ("hollow+pad-ffn", "trim", "trim+hollow+pad-ffn"):
        for depth in ("measured", "full_depth"):
            assert configs[name][depth]["prefill_gflops"] < full[depth]["prefill_gflops"], (name, depth)


def test_composition_is_checked_at_the_built_depth(bench: tuple[dict[str, Any], Path]) -> None:
    report, _ = bench
    assert report["probe_layers"] == 1
    for c in report["configs"]:
        check = c["check"]
        assert check["depth"] == LAYERS
        t = check["ttft_ms"]
        assert t["measured"] == c["measured"]["ttft_ms"]
        assert t["error"] == pytest.approx(t["composed"] / t["measured"] - 1)
        stages = c["stages"]
        kinds = Config(c["name"], c["framework"], bool(c["ffn_layers"])).layer_kinds(SMALL.full_layers)
        composed = stages["rest_prefill_ms"] + sum(stages["layer_prefill_ms"][k] for k in kinds)
        assert c["full_depth"]["ttft_ms"] == pytest.approx(composed)
        assert isinstance(check["within_tolerance"], bool)
        assert set(c["layers"]) == ({"full", "reduced"} if c["ffn_layers"] else {"full"})
    configs = by_name(report)
    full, reduced = (
        configs["hollow+pad-ffn"]["layers"]["full"],
        configs["hollow+pad-ffn"]["layers"]["reduced"],
    )
    assert (
        reduced["gflops"] < full["gflops"] == pytest.approx(configs["unreduced"]["layers"]["full"]["gflops"])
    )


def test_report_files(bench: tuple[dict[str, Any], Path]) -> None:
    report, out = bench
    assert json.loads((out / "bench.json").read_text())["configs"] == report["configs"]
    md = (out / "bench.md").read_text()
    for c in CONFIGS:
        assert f"| {c.name} |" in md
    assert "Composed at full depth (8 decoder layers)" in md and "within 5%" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def linear_measurement(per_layer: float, rest: float, built: int, m: int) -> dict[str, Any]:
    """An eager measurement that is exactly linear in depth, as the composition assumes."""

    def at(depth: int) -> dict[str, float]:
        return {"ttft_ms": rest + per_layer * depth, "decode_tokens_per_s": 1e3 / (rest / 10 + depth)}

    return {
        **at(built),
        "tokens": [5, 6, 7],
        "prompt_tokens": 20,
        "visual_tokens": 16,
        "peak_rss_mb": 100.0,
        "weights_mb": 50.0,
        "depths": {str(m): at(m), "0": at(0)},
    }


def test_composition_of_a_linear_model_is_exact() -> None:
    config = Config("transformers-eager", "transformers")
    measured = linear_measurement(per_layer=30.0, rest=200.0, built=4, m=2)
    assert stage_model(config, measured, 2).layer_prefill_ms == {"full": pytest.approx(30.0)}
    result = compose(SMALL, config, measured, Reductions(), built=4, m=2, peak_gflops=10.0, peak_gb_per_s=5.0)
    assert result["check"]["ttft_ms"]["error"] == pytest.approx(0.0, abs=1e-12)
    assert result["check"]["within_tolerance"]
    assert result["full_depth"]["ttft_ms"] == pytest.approx(200.0 + 30.0 * SMALL.full_layers)
    assert result["full_depth"]["decode_tokens_per_s"] == pytest.approx(1e3 / (20.0 + SMALL.full_layers))
    # decode reads every weight (fp32: 4 bytes) and the KV cache at the mean position of the answer
    full = result["full_depth"]
    d, depth, positions = SMALL.hidden_size, SMALL.full_layers, 20 + 3 / 2
    layer = 4 * (4 * d * d + 3 * d * SMALL.intermediate_size) + 4 * 2 * d
    step_bytes = depth * layer + 4 * d * SMALL.vocab_size + 4 * 2 * depth * d * positions
    assert full["decode_step_mb"] * 2**20 == pytest.approx(step_bytes)
    assert full["decode_gb_per_s"] == pytest.approx(step_bytes * full["decode_tokens_per_s"] / 1e9)
    assert full["gemv_peak_share"] == pytest.approx(full["decode_gb_per_s"] / 5.0)
    report = with_ratios(
        {
            "configs": [{"name": config.name, **result}, {"name": "unreduced", **result}],
            "gemm_peak": {"gflops_per_s": 10.0},
            "gemv_peak": {"gb_per_s": 5.0},
        }
    )
    unreduced = report["configs"][1]["full_depth"]
    assert unreduced["ttft_vs_eager"] == pytest.approx(1.0)
    # the roofline: the same FLOPs at the GEMM peak, the same bytes at the GEMV peak
    assert unreduced["ttft_roofline_vs_eager"] == pytest.approx(full["gemm_peak_share"])
    assert unreduced["decode_roofline_vs_eager"] == pytest.approx(1 / full["gemv_peak_share"])
    roofline = {t["target"]: t["roofline"] for t in report["targets"]}
    assert roofline[TARGETS[1][-1]] == pytest.approx(1 / full["gemv_peak_share"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "1"], "--layers must be at least 2"),
        (["--trim", "off"], "--trim takes iqr or ratio:R"),
        (["--trim", "ratio:x"], "--trim takes iqr or ratio:R"),
        (["--work", "/nonexistent/dir"], "not a directory"),
        (["--runs", "0"], "--runs must be at least 1"),
    ],
)
def test_bad_input_is_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert rlens_main(["bench", "--geometry", "small", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlens: error: ") and message in err and "\n" not in err
