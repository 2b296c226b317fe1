"""``rlens eval OUT_DIR --data DATA.jsonl``: accuracy of an artifact; ``--toy-set N -o`` writes a set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlens.cli.tables import print_table

DESCRIPTION = (
    "Answer every question of a data set with an exported pipeline (greedy, --batch-size questions per "
    "batch) and report the accuracy overall and per kind, the mean number of visual tokens and the time "
    "to first token (with a batch size above 1, every question gets its batch's TTFT). A prediction is "
    "right if, after normalization (lowercase, no punctuation or articles, number words as digits), it "
    "equals the answer or starts with it followed by a word boundary. Data lines: "
    '{"image": path, "prompt": str, "answer": str, "kind": str (optional)}. '
    "With --toy-set N, write N generated questions about generated shape scenes to -o and exit."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy of an artifact on a question set", description=DESCRIPTION)
    p.add_argument("artifact_dir", nargs="?", metavar="OUT_DIR", help="directory written by `rlens export`")
    p.add_argument("--data", type=Path, metavar="DATA.jsonl", help="the question set to evaluate on")
    p.add_argument(
        "--max-new-tokens", type=int, default=8, metavar="N", help="answer length budget (default 8)"
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="questions per batch (default 8)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N questions only")
    p.add_argument(
        "--provider",
        default="cpu",
        choices=["cpu", "cuda", "tensorrt"],
        help="cpu or cuda: ONNX Runtime's providers; tensorrt: the TensorRT engines `--target tensorrt` "
        "built, else ONNX Runtime's TensorRT provider (default cpu)",
    )
    p.add_argument(
        "--predictions", type=Path, metavar="FILE.jsonl", help="also write every question's prediction here"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    toy = p.add_argument_group("writing a toy set (instead of evaluating)")
    toy.add_argument("--toy-set", type=int, metavar="N", help="write N generated questions to -o and exit")
    toy.add_argument("--seed", type=int, default=0, metavar="S", help="toy set seed (default 0)")
    toy.add_argument("--image-size", type=int, default=224, metavar="PX", help="toy image side (default 224)")
    toy.add_argument(
        "-o", "--output", type=Path, metavar="DATA.jsonl", help="toy set file (images go beside it)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlens.errors import RlensError

    if args.toy_set is not None:
        return write_toy_set(args)
    if args.output is not None:
        raise RlensError("-o/--output is for --toy-set; to keep the predictions give --predictions")
    if args.artifact_dir is None or args.data is None:
        raise RlensError("give OUT_DIR and --data DATA.jsonl (or --toy-set N -o DATA.jsonl to write a set)")

    from rlens.eval import evaluate_artifact

    report = evaluate_artifact(
        args.artifact_dir,
        args.data,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        provider=args.provider,
        progress=not (args.quiet or args.json),
    )
    if args.predictions is not None:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        args.predictions.write_text(
            "".join(json.dumps(p.to_json()) + "\n" for p in report.predictions), encoding="utf-8"
        )
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    print(
        f"{report.correct}/{report.count} correct ({report.accuracy:.1%}); "
        f"{report.mean_visual_tokens:g} visual tokens on average; TTFT mean {report.mean_ttft_ms:.1f} ms, "
        f"median {report.median_ttft_ms:.1f} ms"
        + (f" (per batch of {report.batch_size})" if report.batch_size > 1 else "")
    )
    rows = [[kind, r.count, r.correct, f"{r.accuracy:.1%}"] for kind, r in report.per_kind.items()]
    rows.append(["overall", report.count, report.correct, f"{report.accuracy:.1%}"])
    print_table(["kind", "questions", "correct", "accuracy"], rows)
    return 0


def write_toy_set(args: argparse.Namespace) -> int:
    from rlens.errors import RlensError
    from rlens.toy.data import toy_set, write_jsonl

    if args.artifact_dir is not None or args.data is not None:
        raise RlensError("--toy-set writes a data set and exits; leave out OUT_DIR and --data")
    if args.output is None:
        raise RlensError("--toy-set needs -o DATA.jsonl, the file to write")
    if args.toy_set < 1:
        raise RlensError(f"--toy-set must be at least 1, got {args.toy_set}")
    if args.image_size < 32:
        raise RlensError(f"--image-size must be at least 32, got {args.image_size}")
    try:
        path = write_jsonl(toy_set(args.toy_set, args.seed, args.image_size), args.output)
    except OSError as e:
        raise RlensError(f"cannot write the toy set to '{args.output}' ({' '.join(str(e).split())})") from e
    if args.json:
        print(json.dumps({"data": str(path), "count": args.toy_set, "seed": args.seed}))
    else:
        print(f"wrote {args.toy_set} questions to {path} (images in {path.parent / 'images'})")
    return 0
