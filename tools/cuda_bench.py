"""Time the exported pipeline on ``--provider cuda`` against transformers eager on the same GPU.

    python tools/cuda_bench.py --layers 4 --out runs/cuda_bench.json

A random LLaVA-1.5-7B-geometry checkpoint (``rlens.bench.model``: ViT-L/14-336, d 4096, the chosen
number of decoder layers) is exported at fp32 and fp16 and each runs one image and a short prompt:
time to first token (image and text in, first token out, preprocessing included on both sides) and
decode tokens/s over ``--new-tokens`` tokens, median of ``--runs`` after a warm-up. EOS is ignored
on both sides so every run decodes the same number of tokens. transformers runs at the same two
precisions, with TF32 allowed for its fp32 MatMuls as ONNX Runtime's CUDA provider allows by default
(``use_tf32``), and with the KV cache it keeps on the GPU. ``rlens bench`` is the CPU benchmark; this
is its GPU counterpart, kept small: one geometry, no composition to full depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Describe the picture."


def eager(checkpoint: Path, dtype: str, new_tokens: int, runs: int) -> dict[str, float]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from rlens.exporter.validate import sample_image

    torch.backends.cuda.matmul.allow_tf32 = True
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=getattr(torch, dtype))
    model = model.to("cuda").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    image = sample_image(model.config.vision_config.image_size)
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        inputs = processor(images=image, text=text, return_tensors="pt").to("cuda")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(new_tokens)  # warm-up
    first = statistics.median(generate(1) for _ in range(runs))
    whole = statistics.median(generate(new_tokens) for _ in range(runs))
    return {"ttft_ms": first * 1e3, "decode_tokens_per_s": (new_tokens - 1) / (whole - first)}


def exported(artifact: Path, new_tokens: int, runs: int) -> dict[str, float]:
    from rlens.exporter.validate import sample_image
    from rlens.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(artifact, provider="cuda")
    generation = dataclasses.replace(pipeline.manifest.generation, eos_token_ids=[])
    pipeline.manifest = dataclasses.replace(pipeline.manifest, generation=generation)
    image = sample_image(pipeline.manifest.model.image_size)
    pipeline.generate(image, PROMPT, new_tokens)  # warm-up
    results = [pipeline.generate(image, PROMPT, new_tokens) for _ in range(runs)]
    assert all(len(r.token_ids) == new_tokens for r in results)
    return {
        "ttft_ms": statistics.median(r.ttft_ms for r in results),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results),
        "visual_tokens": results[0].num_visual_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the random model (default 4)")
    p.add_argument("--new-tokens", type=int, default=33, help="tokens generated per run (default 33)")
    p.add_argument("--runs", type=int, default=5, help="timed runs after a warm-up (default 5)")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    p.add_argument("--work", type=Path, help="folder for the checkpoint and exports (default: a temp one)")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from rlens.bench.model import GEOMETRIES, make_random_llava
    from rlens.cli.main import main as rlens_main

    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        print("cuda_bench needs a CUDA build of torch and onnxruntime-gpu (see the README)", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="rlens-cuda-bench-"))
    checkpoint = work / "checkpoint"
    if not checkpoint.is_dir():
        make_random_llava(checkpoint, GEOMETRIES["llava-1.5-7b"], args.layers)
    rows: dict[str, Any] = {}
    for precision, dtype in (("fp32", "float32"), ("fp16", "float16")):
        artifact = work / precision
        if not artifact.is_dir():
            flags = ["-q", "--precision", precision, "--atol", "1"]  # random weights: only the timing counts
            assert rlens_main(["export", str(checkpoint), "-o", str(artifact), *flags]) == 0
        rows[f"rlens {precision}"] = exported(artifact, args.new_tokens, args.runs)
        rows[f"eager {precision}"] = eager(checkpoint, dtype, args.new_tokens, args.runs)
    device = torch.cuda.get_device_name()
    print(f"\nLLaVA-1.5-7B geometry, {args.layers} decoder layers, {device}, onnxruntime {ort.__version__}")
    print(f"{'':12} {'TTFT ms':>9} {'decode tok/s':>13} {'TTFT vs eager':>14} {'decode vs eager':>16}")
    for name, row in rows.items():
        base = rows[f"eager {name.split()[1]}"]
        print(
            f"{name:12} {row['ttft_ms']:9.2f} {row['decode_tokens_per_s']:13.1f} "
            f"{row['ttft_ms'] / base['ttft_ms']:13.2f}x "
            f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:15.2f}x"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"layers": args.layers, "runs": args.runs, "new_tokens": args.new_tokens, "device": device}
        meta["onnxruntime"] = ort.__version__
        meta["torch"] = torch.__version__
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
