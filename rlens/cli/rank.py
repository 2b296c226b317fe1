"""``rlens rank MODEL_DIR --calib CALIB.jsonl -o ranking.json``: the Layer Ranking Algorithm."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlens.cli.args import add_reduction_parameter_args, reduction_parameters
from rlens.cli.tables import print_table

DESCRIPTION = (
    "Rank the decoder layers by how little Hollow Attention and PAD-FFN cost there (greedy forward "
    "selection on a calibration set; score: mean KL divergence of the next-token distributions at the "
    "answer positions against the unreduced model). Writes ranking.json after every step, so an interrupted "
    "run resumes, and a PNG of score against number of reduced layers. Calibration lines: "
    '{"image": path, "prompt": str, "answer": str (optional)}.'
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="rank layers for the reductions", description=DESCRIPTION)
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="LLaVA checkpoint directory, or `toy` for the model rlens ships",
    )
    p.add_argument("--calib", required=True, type=Path, metavar="CALIB.jsonl", help="calibration set")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="RANKING.json",
        help="ranking file to write (an unfinished one with the same inputs is resumed)",
    )
    p.add_argument(
        "--plot", type=Path, metavar="PNG", help="chart to write (default: beside the ranking, .png)"
    )
    add_reduction_parameter_args(p)
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlens.exporter.layer_ranking import plot_ranking, rank_layers

    ranking = rank_layers(
        args.model_dir,
        args.calib,
        args.output,
        progress=not args.quiet,
        **reduction_parameters(args),
    )
    plot = plot_ranking(ranking, args.plot or args.output.with_suffix(".png"))
    if args.json:
        print(json.dumps({"ranking": str(args.output), "plot": str(plot), **ranking.to_json()}))
        return 0
    print(f"ranked {ranking.num_layers} layers -> {args.output} (chart: {plot})")
    print_table(
        ["reduced layers", "hollow: next layer", "hollow: score", "PAD-FFN: next layer", "PAD-FFN: score"],
        [
            [
                n + 1,
                ranking.hollow_order[n],
                f"{ranking.hollow_scores[n]:.3g}",
                ranking.ffn_order[n],
                f"{ranking.ffn_scores[n]:.3g}",
            ]
            for n in range(ranking.num_layers)
        ],
    )
    return 0
