"""``rlens bench``: measured prefill time against predicted FLOPs, with and without reductions."""

from __future__ import annotations

import argparse
import json
import sys

from rlens.cli.args import add_reduction_parameter_args
from rlens.cli.tables import print_table

DESCRIPTION = (
    "Time the decoder prefill of one image prompt at a real model's layer geometry (random weights, no "
    "download): unreduced, Hollow Attention on half the layers, PAD-FFN on half the layers, and both. "
    "Prints the measured time saving beside the FLOP saving (median of --runs after a warm-up)."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlens.bench import GEOMETRIES

    p = sub.add_parser("bench", help="prefill time vs FLOPs of the reductions", description=DESCRIPTION)
    p.add_argument(
        "--geometry",
        default="llava-1.5-7b",
        choices=sorted(GEOMETRIES),
        help="layer sizes to build (default llava-1.5-7b: d 4096, d_ff 11008, 32 heads, 576 visual)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=4,
        help="decoder layers to build; the reduced ones are the upper half (default 4)",
    )
    p.add_argument("--runs", type=int, default=5, help="timed prefills per configuration (default 5)")
    p.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: all cores)"
    )
    add_reduction_parameter_args(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlens.bench import bench_decoder_prefill, summary
    from rlens.errors import RlensError
    from rlens.reductions import Reductions

    if args.layers < 2 or args.runs < 1:
        raise RlensError("--layers must be at least 2 and --runs at least 1")
    half = tuple(range(args.layers // 2, args.layers))
    params = dict(hollow_window=args.hollow_window, ffn_keep=args.ffn_keep, probe_every=args.probe_every)
    configs = {
        "unreduced": Reductions(**params),
        "hollow-half": Reductions(hollow_layers=half, **params),
        "pad-ffn-half": Reductions(ffn_layers=half, **params),
        "both-half": Reductions(hollow_layers=half, ffn_layers=half, **params),
    }
    results = summary(
        bench_decoder_prefill(
            args.geometry,
            args.layers,
            configs,
            args.runs,
            args.threads,
            log=lambda m: print(m, file=sys.stderr),
        )
    )
    if args.json:
        print(json.dumps({"geometry": args.geometry, "layers": args.layers, "results": results}))
        return 0
    print_table(
        ["config", "decoder GFLOPs", "median ms", "FLOP saving", "time saving", "time/FLOP saving"],
        [
            [
                r["name"],
                f"{r['decoder_gflops']:.1f}",
                f"{r['median_ms']:.0f}",
                f"{100 * r['flop_saving']:.1f}%",
                f"{100 * r['time_saving']:.1f}%",
                "-" if r["time_over_flop_saving"] is None else f"{r['time_over_flop_saving']:.2f}",
            ]
            for r in results
        ],
    )
    return 0
