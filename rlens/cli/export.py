"""``rlens export MODEL_DIR -o OUT_DIR``."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rlens.cli.args import (
    add_precision_arg,
    add_reduction_args,
    add_target_args,
    add_trim_args,
    reduction_options,
    target_options,
    trim_options,
)
from rlens.cli.tables import print_table
from rlens.precision import DEFAULT_ATOL

if TYPE_CHECKING:
    from rlens.manifest import CostInfo, TensorRTInfo
    from rlens.reductions import Reductions

DESCRIPTION = (
    "Export a local transformers LLaVA checkpoint (LLaMA, Mistral or Qwen2 text backbone) to an "
    "artifact directory: vision.onnx, embedding.onnx, decoder.onnx (with the chosen Hollow Attention and "
    "PAD-FFN layers), trim.onnx with --clip-model, rlens.json and the tokenizer and processor files. The "
    "graphs are checked against the PyTorch model (or the PyTorch reference of the reductions) before "
    "the directory appears."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="checkpoint directory as save_pretrained writes it, or `toy` for the model rlens ships",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT_DIR",
        help="artifact directory to write (an existing artifact there is replaced)",
    )
    p.add_argument(
        "--atol",
        type=float,
        help="largest accepted difference to PyTorch, relative to max(1, |reference|) (default by "
        f"precision: {', '.join(f'{k} {v:g}' for k, v in DEFAULT_ATOL.items())})",
    )
    add_reduction_args(p)
    add_trim_args(p)
    add_target_args(p)
    add_precision_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_arguments(sub.add_parser("export", help="checkpoint -> artifact directory", description=DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    from rlens.exporter.export import ExportOptions, export

    options = ExportOptions(
        atol=args.atol,
        precision=args.precision,
        progress=not args.quiet,
        **reduction_options(args),
        **trim_options(args),
        **target_options(args),
    )
    manifest = export(args.model_dir, args.output, options)
    v, cost, r = manifest.validation, manifest.cost, manifest.reductions
    assert v is not None and cost is not None
    summary = {
        "output": args.output,
        "graphs": {name: g.file for name, g in manifest.graphs.items()},
        "num_visual_tokens": manifest.model.num_visual_tokens,
        "precision": manifest.precision,
        "reductions": {
            "hollow_layers": list(r.hollow_layers),
            "hollow_window": r.hollow_window,
            "ffn_layers": list(r.ffn_layers),
            "ffn_keep": r.ffn_keep,
            "probe_every": r.probe_every,
        },
        "trim": None
        if manifest.trim is None
        else {
            "mode": manifest.trim.mode,
            "ratio": manifest.trim.ratio,
            "select": manifest.trim.select,
            "max_tokens": manifest.trim.max_tokens,
            "sample_tokens": cost.reduced_visual_tokens,
        },
        "prefill_flops": {
            "prompt_tokens": cost.prompt_tokens,
            "unreduced": cost.unreduced["total"],
            "exported": cost.reduced["total"],
        },
        "validation": {
            "image_features": v.image_features_max_diff,
            "prefill_logits": v.prefill_logits_max_diff,
            "decode_logits": v.decode_logits_max_diff,
            "trim_features": v.trim_features_max_diff,
            "atol": v.atol,
        },
        "tensorrt": None
        if manifest.tensorrt is None
        else {
            "version": manifest.tensorrt.version,
            "gpu": manifest.tensorrt.gpu,
            "engines": manifest.tensorrt.engines,
        },
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    quantized = "" if manifest.precision == "fp32" else f" (decoder weights {manifest.precision})"
    print(f"exported {args.model_dir} -> {args.output}{quantized}")
    print_table(
        ["graph", "file", "inputs", "outputs"],
        [
            [
                name,
                g.file,
                ", ".join(t.name for t in g.inputs[:3]) + (" ..." if len(g.inputs) > 3 else ""),
                ", ".join(t.name for t in g.outputs[:2]) + (" ..." if len(g.outputs) > 2 else ""),
            ]
            for name, g in manifest.graphs.items()
        ],
    )
    print_table(
        ["validated against PyTorch", "max difference"],
        [
            ["image features", f"{v.image_features_max_diff:.2e}"],
            ["prefill logits", f"{v.prefill_logits_max_diff:.2e}"],
            ["decode logits", f"{v.decode_logits_max_diff:.2e}"],
            *(
                [["TRIM features", f"{v.trim_features_max_diff:.2e}"]]
                if v.trim_features_max_diff is not None
                else []
            ),
        ],
    )
    if manifest.trim is not None:
        t = manifest.trim
        keeps = f"the top {t.ratio:g} share" if t.mode == "ratio" else "the IQR outliers"
        print(
            f"\nTRIM ({t.select} selection) keeps {keeps} of the {manifest.model.num_visual_tokens} visual "
            f"tokens, plus one merged token: 1 to {t.max_tokens} per image; "
            f"{cost.reduced_visual_tokens} on the validation sample (noise; real images differ)"
        )
    print_flops(cost, r)
    if manifest.tensorrt is not None:
        print(f"\n{describe_engines(manifest.tensorrt)}")
    return 0


def describe_engines(t: TensorRTInfo) -> str:
    """One line on an artifact's engines: what built them, for which GPU, within which bounds."""
    return (
        f"TensorRT {t.version} engines for {t.gpu} (compute {t.compute_capability}): "
        f"{', '.join(t.engines.values())}; batch <= {t.max_batch}, context <= {t.max_context}"
    )


def print_flops(cost: CostInfo, r: Reductions) -> None:
    """Prefill GFLOPs of the exported configuration beside the unreduced one."""
    kept = cost.reduced_visual_tokens
    trimmed = f", {kept} after TRIM" if kept is not None and kept != cost.visual_tokens else ""
    print(
        f"\nprefill of {cost.prompt_tokens} tokens ({cost.visual_tokens} visual{trimmed}); "
        f"hollow layers {list(r.hollow_layers) or '-'} (window {r.hollow_window}), "
        f"PAD-FFN layers {list(r.ffn_layers) or '-'} (keep {r.ffn_keep:g}, probe every {r.probe_every})"
    )
    rows = []
    for part in ("vision", "decoder", "lm_head", "total"):
        before, after = cost.unreduced[part], cost.reduced[part]
        saving = f"{100 * (1 - after / before):.1f}%" if before else "-"
        rows.append([part, f"{before / 1e9:.4f}", f"{after / 1e9:.4f}", saving])
    print_table(["GFLOPs", "unreduced", "exported", "saving"], rows)
