"""``rlens run OUT_DIR --image IMG --prompt TEXT``: answer with the exported pipeline."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = (
    "Answer a question about an image with an exported pipeline, on ONNX Runtime only. Prints the "
    "answer as it is generated, or one JSON object with --json."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="answer a question with an artifact directory", description=DESCRIPTION)
    p.add_argument("artifact_dir", metavar="OUT_DIR", help="directory written by `rlens export`")
    p.add_argument("--image", metavar="IMG", help="image file (PNG, JPEG, ...); omit for a text-only prompt")
    p.add_argument(
        "--prompt",
        required=True,
        metavar="TEXT",
        help="the question; put <image> in it to place the image yourself",
    )
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="default: the checkpoint's generation config"
    )
    p.add_argument(
        "--provider",
        default="cpu",
        choices=["cpu", "cuda", "tensorrt"],
        help="cpu or cuda: ONNX Runtime's providers; tensorrt: the TensorRT engines `--target tensorrt` "
        "built, else ONNX Runtime's TensorRT provider (default cpu)",
    )
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, metavar="T")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--seed", type=int, metavar="S", help="random seed for sampling")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: text, token_ids, prompt_ids, num_visual_tokens, ttft_ms, "
        "decode_tokens_per_s, finish_reason",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlens.errors import RlensError
    from rlens.runtime.pipeline import Pipeline
    from rlens.runtime.preprocess import load_image

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise RlensError("--max-new-tokens must be at least 1")
    image = load_image(args.image) if args.image else None
    pipeline = Pipeline.load(args.artifact_dir, provider=args.provider)
    options = dict(
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.json:
        result = pipeline.generate(image, args.prompt, args.max_new_tokens, **options)
        print(json.dumps(result.to_dict()))
        return 0
    for piece in pipeline.stream(image, args.prompt, args.max_new_tokens, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
