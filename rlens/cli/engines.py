"""``rlens engines OUT_DIR``: build (or rebuild) an artifact's TensorRT engines on this machine."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Build a TensorRT engine per graph of an artifact directory on this machine's GPU, from the ONNX "
    "graphs already there, and record them in rlens.json. For an artifact exported on another machine "
    "(a CPU build box, CI) with `--target tensorrt` (or unreduced, at fp32 or fp16: those graphs are the "
    "same on both tracks), or whose engines were built for another TensorRT release or GPU (the runtime "
    "refuses those): the checkpoint is not needed. Bounds not given keep the ones the artifact's engines "
    "were built with, else the model's (an export that could not build engines prints the command with "
    "the bounds it was given). Needs the tensorrt package and an NVIDIA GPU; the engines replace the old "
    "ones only once all are built, so a rebuild needs room for both sets."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "engines", help="build an artifact's TensorRT engines on this machine", description=DESCRIPTION
    )
    p.add_argument("artifact_dir", metavar="OUT_DIR", help="directory written by `rlens export`")
    p.add_argument("--max-batch", type=int, metavar="N", help="largest batch (default: as built, else 1)")
    p.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="longest prompt plus answer (default: as built, else the model's)",
    )
    p.add_argument(
        "--max-visual-tokens",
        type=int,
        metavar="N",
        help="image-feature rows per image (default: as built, else the vision graph's, TRIM's V + 1)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from rlens.cli.export import describe_engines
    from rlens.exporter.export import build_tensorrt_engines
    from rlens.manifest import read_manifest
    from rlens.tensorrt.engines import EngineLimits

    directory = Path(args.artifact_dir)
    manifest = read_manifest(directory)
    built = manifest.tensorrt
    as_built = (
        EngineLimits(built.max_batch, built.max_context, built.max_visual_tokens) if built else EngineLimits()
    )
    given = {
        "max_batch": args.max_batch,
        "max_context": args.max_context,
        "max_visual_tokens": args.max_visual_tokens,
    }
    # a bound given as 0 stays 0, for resolve_limits to refuse
    limits = replace(as_built, **{name: value for name, value in given.items() if value is not None})
    t = build_tensorrt_engines(directory, manifest, limits).tensorrt
    assert t is not None
    print(f"{describe_engines(t)} (in {directory})")
    return 0
