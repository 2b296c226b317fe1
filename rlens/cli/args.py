"""Option groups shared by subcommands, so a flag means the same thing everywhere it appears."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rlens.precision import PRECISIONS
from rlens.reductions import DEFAULT_FFN_KEEP, DEFAULT_HOLLOW_WINDOW, DEFAULT_PROBE_EVERY


def add_reduction_parameter_args(p: argparse.ArgumentParser) -> None:
    """The parameters of each reduction (used by `rank`, `export` and `bench`)."""
    g = p.add_argument_group("reduction parameters (RedundancyLens)")
    g.add_argument(
        "--hollow-window",
        type=int,
        default=DEFAULT_HOLLOW_WINDOW,
        metavar="R",
        help=f"Hollow Attention: visual tokens see the R latest visual tokens (default "
        f"{DEFAULT_HOLLOW_WINDOW})",
    )
    g.add_argument(
        "--ffn-keep",
        type=float,
        default=DEFAULT_FFN_KEEP,
        metavar="RHO",
        help=f"PAD-FFN: share of FFN channels visual tokens keep; 0 skips their FFN (default "
        f"{DEFAULT_FFN_KEEP})",
    )
    g.add_argument(
        "--probe-every",
        type=int,
        default=DEFAULT_PROBE_EVERY,
        metavar="S",
        help=f"PAD-FFN: one probe token per S visual tokens (default {DEFAULT_PROBE_EVERY})",
    )


def add_reduction_args(p: argparse.ArgumentParser) -> None:
    """Which layers get which reduction (used by `export`)."""
    add_reduction_parameter_args(p)
    g = p.add_argument_group("reduced layers")
    g.add_argument(
        "--hollow-layers",
        default="",
        metavar="N|i,j,k",
        help="layers with Hollow Attention: the first N of the ranking, or a list (one layer: 'i,')",
    )
    g.add_argument(
        "--ffn-layers",
        default="",
        metavar="N|i,j,k",
        help="layers with PAD-FFN: the first N of the ranking, or a list (one layer: 'i,')",
    )
    g.add_argument(
        "--ranking", type=Path, metavar="RANKING.json", help="layer ranking written by `rlens rank`"
    )
    g.add_argument(
        "--calib",
        type=Path,
        metavar="CALIB.jsonl",
        help="rank the layers on this calibration set when a count is given without --ranking",
    )


def add_trim_args(p: argparse.ArgumentParser) -> None:
    """TRIM: keep the visual tokens the instruction needs (used by `export`)."""
    g = p.add_argument_group("TRIM (token selection by CLIP similarity)")
    g.add_argument(
        "--clip-model",
        type=Path,
        metavar="DIR",
        help="the CLIPModel LLaVA's vision tower comes from (local save_pretrained directory, or `toy` "
        "for the shipped toy model's CLIP); enables TRIM",
    )
    g.add_argument(
        "--trim",
        default="",
        metavar="iqr|ratio:R|off",
        help="keep the IQR outliers (default with --clip-model), the top R share, or nothing",
    )
    g.add_argument(
        "--trim-select",
        default="high",
        choices=["high", "low"],
        help="high: most similar to the instruction (the paper); low: least similar (the public "
        "code's behaviour)",
    )


def trim_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(clip_model=args.clip_model, trim=args.trim, trim_select=args.trim_select)


def reduction_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``add_reduction_parameter_args``' group, as keywords (export, rank, bench)."""
    return dict(hollow_window=args.hollow_window, ffn_keep=args.ffn_keep, probe_every=args.probe_every)


def reduction_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        hollow_layers=args.hollow_layers,
        ffn_layers=args.ffn_layers,
        ranking=args.ranking,
        calib=args.calib,
        **reduction_parameters(args),
    )


def add_target_args(p: argparse.ArgumentParser) -> None:
    """What the graphs are for: ONNX Runtime, or TensorRT engines built beside them (used by `export`)."""
    g = p.add_argument_group("target")
    g.add_argument(
        "--target",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt"],
        help="tensorrt: after the graphs, build a TensorRT engine per graph (needs the tensorrt package "
        "and an NVIDIA GPU; without them the export stops with the graphs written)",
    )
    g.add_argument(
        "--max-batch", type=int, default=1, metavar="N", help="TensorRT: largest batch (default 1)"
    )
    g.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="TensorRT: longest prompt plus answer, in tokens (default the model's)",
    )
    g.add_argument(
        "--max-visual-tokens",
        type=int,
        metavar="N",
        help="TensorRT: image-feature rows per image (default the vision graph's, TRIM's V + 1)",
    )


def target_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        target=args.target,
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_visual_tokens=args.max_visual_tokens,
    )


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """The decoder's weight precision (used by `export` and `bench`)."""
    p.add_argument(
        "--precision",
        default="fp32",
        choices=list(PRECISIONS),
        help="the decoder's precision: fp32; fp16 (weights, activations and KV cache, for GPUs: CUDA and "
        "TensorRT); or int8 / int4 weight blocks (ONNX Runtime's MatMulNBits, for CPU; not TensorRT); the "
        "other graphs stay fp32 (default fp32)",
    )
