"""``rlens make-tiny OUT_DIR``: a tiny random-initialized LLaVA checkpoint, made offline."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Write a tiny random-initialized LLaVA checkpoint (model, tokenizer, image processor, chat "
    "template) with save_pretrained, to try rlens without downloading a model. Its answers are "
    "gibberish: it exercises the pipeline, not accuracy."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlens.tiny import BACKBONES

    p = sub.add_parser("make-tiny", help="write a tiny random LLaVA checkpoint", description=DESCRIPTION)
    p.add_argument("output", metavar="OUT_DIR")
    p.add_argument("--backbone", default="llama", choices=BACKBONES, help="text backbone (default llama)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clip",
        metavar="CLIP_DIR",
        help="also write a tiny CLIPModel sharing the vision tower, to try TRIM (--clip-model)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlens.tiny import TinySpec, make_tiny_llava

    path = make_tiny_llava(
        args.output, TinySpec(backbone=args.backbone, num_layers=args.layers, seed=args.seed)
    )
    print(f"wrote a tiny {args.backbone} LLaVA checkpoint to {path}")
    if args.clip:
        from rlens.tiny import make_tiny_clip

        clip = make_tiny_clip(args.clip, path, seed=args.seed)
        print(f"wrote a tiny CLIP model with its vision tower to {clip}")
    return 0
