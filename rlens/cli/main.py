"""``rlens``: one command, one subcommand per job.

    rlens export MODEL_DIR -o OUT_DIR     checkpoint -> artifact directory (also `rlens-export`)
    rlens run OUT_DIR --image --prompt    answer a question with the exported pipeline
    rlens rank MODEL_DIR --calib -o       rank the layers for Hollow Attention and PAD-FFN
    rlens eval OUT_DIR --data DATA.jsonl  accuracy per question kind, visual tokens, time to first token
    rlens bench                           against transformers: TTFT, decode, memory (random weights)
    rlens make-tiny OUT_DIR               a tiny random LLaVA checkpoint, to try rlens without a download
    rlens check --tensorrt OUT_DIR        the graphs against TensorRT's ONNX parser rules, without a GPU
    rlens engines OUT_DIR                 build (or rebuild) an artifact's TensorRT engines on this GPU

User errors print one line and exit 1; torch and transformers are imported only by the
subcommands that need them, so ``rlens run`` works with the runtime dependencies alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rlens import __version__
from rlens.cli import bench as bench_cmd
from rlens.cli import check as check_cmd
from rlens.cli import engines as engines_cmd
from rlens.cli import eval as eval_cmd
from rlens.cli import export as export_cmd
from rlens.cli import make_tiny as make_tiny_cmd
from rlens.cli import rank as rank_cmd
from rlens.cli import run as run_cmd
from rlens.errors import RlensError

SUBCOMMANDS = (export_cmd, run_cmd, rank_cmd, eval_cmd, bench_cmd, make_tiny_cmd, check_cmd, engines_cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlens",
        description="Export LLaVA-family models to static ONNX graphs with their visual-token redundancy "
        "cut out (Hollow Attention, PAD-FFN, TRIM), and run them with ONNX Runtime.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `rlens SUBCOMMAND --help` for the options of each.",
    )
    p.add_argument("--version", action="version", version=f"rlens {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return p


def run_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except RlensError as e:
        print(f"rlens: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `rlens ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("rlens: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(parser().parse_args(argv))


def export_main(argv: Sequence[str] | None = None) -> int:
    """``rlens-export``: the same as ``rlens export``."""
    p = argparse.ArgumentParser(prog="rlens-export", description=export_cmd.DESCRIPTION)
    export_cmd.add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
