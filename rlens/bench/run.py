"""``run_bench``: build the model, export each configuration, measure each in its own process, compose.

    build random LLaVA + CLIP + probe decoders (builder) -> GEMM and GEMV peaks (children)
    -> transformers eager (child)
    -> for each exported configuration: export (builder) -> measure (child) -> delete the artifact
    -> compose full-depth figures, check them at the built depth, compare with eager

The builder is one worker process for everything that needs torch on the rlens side (it imports
torch and transformers once); every measurement gets a fresh process of its own. Artifacts are
measured and deleted one at a time, so the disk holds the checkpoint and one artifact.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlens.bench.compose import compose
from rlens.bench.measure import (
    child_process,
    export_config,
    gemm_peak,
    gemv_peak,
    in_child,
    measure_eager,
    measure_pipeline,
)
from rlens.bench.model import CONFIGS, GEOMETRIES, Config, build_bench_model, probe_depth, upper_half
from rlens.errors import RlensError
from rlens.precision import PRECISIONS
from rlens.reductions import Reductions

DEFAULT_PROMPT = "Describe the image in detail."
DEFAULT_TRIM = "ratio:0.21"  # TRIM's model card: about 21% of the image tokens kept


@dataclass(frozen=True)
class BenchOptions:
    geometry: str = "llava-1.5-7b"
    layers: int = 4
    runs: int = 5
    new_tokens: int = 16
    prompt: str = DEFAULT_PROMPT
    reductions: Reductions = field(default_factory=Reductions)
    """Hollow Attention and PAD-FFN parameters; the layers are always the upper half."""
    trim: str = DEFAULT_TRIM
    precision: str = "fp32"
    """The exported configurations' decoder weights (``rlens export --precision``); eager stays fp32."""
    seed: int = 0
    work: Path | None = None
    """Where the temporary checkpoint and artifacts go (default: the system's temporary directory)."""

    def check(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise RlensError(f"unknown geometry '{self.geometry}'; choose one of {', '.join(GEOMETRIES)}")
        if self.layers < 2:
            raise RlensError(
                f"--layers must be at least 2 (the composition is fitted on half), got {self.layers}"
            )
        if self.runs < 1 or self.new_tokens < 2:
            raise RlensError("--runs must be at least 1 and --new-tokens at least 2")
        if self.trim != "iqr" and not 0 < _ratio(self.trim) <= 1:
            raise RlensError(f"--trim takes iqr or ratio:R (0 < R <= 1), got '{self.trim}'")
        if self.precision not in PRECISIONS:
            raise RlensError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16":
            raise RlensError(
                "--precision 'fp16' is for GPUs, and rlens bench measures the CPU (ONNX Runtime runs float16 "
                "there through casts); choose fp32, int8 or int4, or time a GPU with tools/cuda_bench.py"
            )
        if self.work is not None and not self.work.is_dir():
            raise RlensError(f"--work {self.work}: not a directory")


def _ratio(trim: str) -> float:
    """R of ``ratio:R``, or -1 when ``trim`` is not of that form (checked before minutes of building)."""
    try:
        return float(trim.removeprefix("ratio:")) if trim.startswith("ratio:") else -1.0
    except ValueError:
        return -1.0


def export_options(config: Config, options: BenchOptions, clip: str) -> dict[str, Any]:
    layers = ",".join(str(i) for i in upper_half(options.layers)) + "," if config.reduced else ""
    r = options.reductions
    trim = {"clip_model": Path(clip), "trim": options.trim} if config.trim else {}
    return dict(
        hollow_layers=layers,
        ffn_layers=layers,
        hollow_window=r.hollow_window,
        ffn_keep=r.ffn_keep,
        probe_every=r.probe_every,
        precision=options.precision,
        **trim,
    )


def run_bench(options: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every configuration of ``CONFIGS`` and return the report (see ``rlens.bench.report``)."""
    options.check()
    g = GEOMETRIES[options.geometry]
    start = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - start:6.0f} s] {message}")

    with (
        tempfile.TemporaryDirectory(prefix="rlens-bench-", dir=options.work) as tmp,
        child_process() as builder,
    ):
        step(f"building a random LLaVA ({options.geometry}, {options.layers} decoder layers) and probes")
        built = builder.submit(
            build_bench_model,
            tmp,
            options.geometry,
            options.layers,
            options.reductions,
            options.seed,
            options.precision,
        ).result()
        step(f"GEMM peak: {'x'.join(map(str, g.peak_gemm))} fp32 MatMul in ONNX Runtime")
        peak = in_child(gemm_peak, *g.peak_gemm, max(options.runs, 5))
        step(f"GEMV peak: a 1x{'x'.join(map(str, g.peak_gemv))} fp32 MatMul's weight read in ONNX Runtime")
        bandwidth = in_child(gemv_peak, *g.peak_gemv, max(options.runs, 5))
        measured = {}
        for config in CONFIGS:
            measured[config.name] = measure_config(config, options, built, builder, Path(tmp), step)
    step("done")
    return {**assemble(options, peak, bandwidth, measured), "wall_s": time.perf_counter() - start}


def measure_config(
    config: Config,
    options: BenchOptions,
    built: dict[str, Any],
    builder: Executor,
    tmp: Path,
    step: Callable[[str], None],
) -> dict[str, Any]:
    """One configuration in a process of its own; an exported one is exported first and deleted after."""
    m = probe_depth(options.layers)
    if config.framework == "transformers":
        step(f"{config.name}: generate at {options.layers}, {m} and 0 decoder layers")
        image_size = GEOMETRIES[options.geometry].image_size
        args = (built["checkpoint"], image_size, options.prompt, options.new_tokens, options.runs, m)
        return in_child(measure_eager, *args)
    artifact = str(tmp / config.name)
    step(f"{config.name}: exporting")
    options_ = export_options(config, options, built["clip"])
    export = builder.submit(export_config, built["checkpoint"], artifact, options_).result()
    step(f"{config.name}: generating")
    kinds = sorted(set(config.layer_kinds(options.layers)))
    args = (artifact, built["probes"], kinds, options.prompt, options.new_tokens, options.runs)
    result = in_child(measure_pipeline, *args)
    shutil.rmtree(artifact)
    return result | export


def assemble(
    options: BenchOptions,
    peak: dict[str, Any],
    bandwidth: dict[str, Any],
    measured: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The report: the run's settings, the GEMM and GEMV peaks, and per configuration what ``compose``
    makes of it."""
    g, m = GEOMETRIES[options.geometry], probe_depth(options.layers)
    configs = []
    for c in CONFIGS:
        result, reductions = measured[c.name], c.reductions(options.layers, options.reductions)
        configs.append(
            {
                "name": c.name,
                "framework": c.framework,
                "trim": options.trim if c.trim else None,
                "hollow_layers": list(reductions.hollow_layers),
                "ffn_layers": list(reductions.ffn_layers),
                "visual_tokens": result["visual_tokens"],
                "prompt_tokens": result["prompt_tokens"],
                "tokens": result["tokens"],
                **compose(
                    g,
                    c,
                    result,
                    options.reductions,
                    options.layers,
                    m,
                    peak["gflops_per_s"],
                    bandwidth["gb_per_s"],
                ),
                "raw": {k: v for k, v in result.items() if k != "tokens"},
            }
        )
    return {
        "geometry": {"name": options.geometry, **asdict(g)},
        "layers": options.layers,
        "probe_layers": m,
        "full_layers": g.full_layers,
        "runs": options.runs,
        "new_tokens": options.new_tokens,
        "prompt": options.prompt,
        "precision": options.precision,
        "reductions": asdict(options.reductions),
        "gemm_peak": peak,
        "gemv_peak": bandwidth,
        "configs": configs,
    }
