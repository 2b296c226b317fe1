"""``rlens bench``: transformers eager against the exported pipeline, with and without reductions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlens.cli.args import add_precision_arg, add_reduction_parameter_args, reduction_parameters
from rlens.cli.tables import print_table

DESCRIPTION = (
    "Build a random-initialized LLaVA of a named geometry (no download) and run one image prompt through "
    "transformers eager and through the exported pipeline: unreduced, Hollow Attention + PAD-FFN on the "
    "upper half of the layers, TRIM, and both. Each configuration runs in its own process: time to first "
    "token, decode tokens/s, peak memory, visual tokens, prefill FLOPs and GFLOP/s against a GEMM peak, "
    "decode GB/s against a GEMV peak, both measured in the same run (median of --runs after a warm-up), "
    "and from the two peaks the best ratio to transformers any graph could reach. Figures for the "
    "model's full depth are composed from stage times and checked against the direct measurement at "
    "--layers."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlens.bench import GEOMETRIES
    from rlens.bench.run import DEFAULT_PROMPT, DEFAULT_TRIM

    p = sub.add_parser(
        "bench", help="rlens against transformers: TTFT, decode, memory", description=DESCRIPTION
    )
    p.add_argument(
        "--geometry",
        default="llava-1.5-7b",
        choices=sorted(GEOMETRIES),
        help="model to build (default llava-1.5-7b: ViT-L/14-336, d 4096, d_ff 11008, 32 heads, 576 visual)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=4,
        help="decoder layers to build; full-depth figures are composed from them (default 4)",
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs per configuration (default 5)")
    p.add_argument("--new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the question (default '{DEFAULT_PROMPT}')")
    add_reduction_parameter_args(p)
    add_precision_arg(p)
    p.add_argument(
        "--trim",
        default=DEFAULT_TRIM,
        metavar="iqr|ratio:R",
        help=f"TRIM's selection in the TRIM configurations (default {DEFAULT_TRIM}: random CLIP scores make "
        "the IQR rule keep almost nothing)",
    )
    p.add_argument(
        "-o", "--out", type=Path, metavar="DIR", help="write bench.json, bench.md and bench.png here"
    )
    p.add_argument(
        "--work", type=Path, metavar="DIR", help="temporary files (default: the system's temp dir)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlens.bench import BenchOptions, run_bench
    from rlens.bench.report import (
        CHECK_HEADER,
        FOLLOWS_HEADER,
        HEADER,
        LAYER_HEADER,
        check_rows,
        follows_rows,
        layer_rows,
        rows,
        target_rows,
        with_ratios,
        write_outputs,
    )
    from rlens.reductions import Reductions

    options = BenchOptions(
        geometry=args.geometry,
        layers=args.layers,
        runs=args.runs,
        new_tokens=args.new_tokens,
        prompt=args.prompt,
        reductions=Reductions(**reduction_parameters(args)),
        trim=args.trim,
        precision=args.precision,
        work=args.work,
    )
    report = with_ratios(run_bench(options, log=lambda m: print(m, file=sys.stderr)))
    if args.out is not None:
        report["files"] = write_outputs(report, args.out)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"composed at full depth ({report['full_layers']} decoder layers):")
    print_table(HEADER, rows(report, "full_depth"))
    print(f"\nmeasured at {report['layers']} decoder layers:")
    print_table(HEADER, rows(report, "measured"))
    print(f"\nthe composition at {report['layers']} layers against the measurement:")
    print_table(CHECK_HEADER, check_rows(report))
    print("\none decoder layer of each kind (prefill):")
    print_table(LAYER_HEADER, layer_rows(report))
    print("\nthe decoder with half its layers reduced against it unreduced (prefill, timed alternately):")
    print_table(FOLLOWS_HEADER, follows_rows(report))
    print(
        f"\nGEMM peak {report['gemm_peak']['gflops_per_s']:.1f} GFLOP/s, GEMV peak "
        f"{report['gemv_peak']['gb_per_s']:.1f} GB/s; targets at full depth (best possible: the roofline):"
    )
    print_table(["target", "value", "best possible", "met"], target_rows(report))
    if "files" in report:
        print(f"\nwrote {', '.join(report['files'].values())}")
    return 0
