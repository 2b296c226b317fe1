"""``rlens check --tensorrt OUT_DIR``: hold an artifact's graphs to TensorRT's ONNX parser rules, no GPU."""

from __future__ import annotations

import argparse
import json

from rlens.cli.tables import print_table

DESCRIPTION = (
    "Check, without a GPU or the tensorrt package, that every graph of an artifact directory is one "
    "TensorRT's ONNX parser imports: each op on its support list for the targeted version, with the "
    "types it takes and its documented restrictions (constant axes, TopK's K, no contrib ops), an "
    "opset it parses, and no graph output whose size only the data decides. Prints a table of the ops "
    "of each graph, or one JSON object with --json; exits 1 when a graph fails, with one line per problem."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlens.tensorrt.support import NEWEST

    newest = f"{NEWEST[0]}.{NEWEST[1]}"
    p = sub.add_parser(
        "check", help="check an artifact's graphs against TensorRT's ONNX parser", description=DESCRIPTION
    )
    p.add_argument("artifact_dir", metavar="OUT_DIR", help="directory written by `rlens export`")
    p.add_argument(
        "--tensorrt",
        action="store_true",
        help="check against TensorRT's ONNX parser (the only check so far, and required)",
    )
    p.add_argument(
        "--trt-version",
        default=newest,
        metavar="10.x",
        help=f"TensorRT release to check against (default {newest}, the newest table rlens has)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlens.errors import RlensError
    from rlens.tensorrt.check import check_artifact
    from rlens.tensorrt.support import MIN_OPSET, parse_target

    if not args.tensorrt:
        raise RlensError("say what to check against: `rlens check --tensorrt OUT_DIR`")
    target = parse_target(args.trt_version)
    report = check_artifact(args.artifact_dir, target)
    if args.json:
        print(json.dumps({"artifact": str(args.artifact_dir), **report.to_dict()}))
        return 0 if report.ok else 1
    print(
        f"TensorRT {target.name} ONNX parser rules (opset {MIN_OPSET} to {target.max_opset}) "
        f"for {args.artifact_dir}"
    )
    for graph in report.graphs:
        print(f"\n{graph.name}: {graph.file}, opset {graph.opset}, {'pass' if graph.ok else 'FAIL'}")
        print_table(["op", "count", "status"], [[u.name, u.count, u.status] for u in graph.ops])
        for note in graph.notes:
            print(f"note: {note}")
    print()
    if report.ok:
        print(f"all {len(report.graphs)} graphs pass")
        return 0
    problems = report.problems
    print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}:")
    for problem in problems:
        print(problem.line())
    return 1
