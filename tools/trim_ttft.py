"""Time to first token with and without TRIM on a small random LLaVA (no download).

Builds a random LLaVA with 256 visual tokens (ViT 224/14) and a CLIP sharing its vision tower,
exports it twice (plain, and with --clip-model), and reports the median time to first token and
the visual tokens of `rlens run` over several questions. Usage: python tools/trim_ttft.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from rlens.tiny import TinySpec, make_tiny_clip, make_tiny_llava

SPEC = TinySpec(
    num_layers=6,
    hidden_size=512,
    intermediate_size=1408,
    num_heads=8,
    num_kv_heads=8,
    vision_layers=4,
    vision_hidden=256,
    vision_heads=4,
    image_size=224,
    patch_size=14,
    seed=3,
)
QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Describe the picture."]


def rlens(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "rlens.cli.main", *args], check=True, capture_output=True, text=True
    ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per question (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlens-trim-") as tmp:
        root = Path(tmp)
        llava = make_tiny_llava(root / "llava", SPEC)
        clip = make_tiny_clip(root / "clip", llava)
        image = root / "image.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 300, 3), dtype=np.uint8)).save(image)
        rlens("export", str(llava), "-o", str(root / "plain"), "-q")
        rlens("export", str(llava), "-o", str(root / "trim"), "-q", "--clip-model", str(clip))
        rows = {}
        for name in ("plain", "trim"):
            ttft, visual = [], []
            for question in QUESTIONS:
                for _ in range(args.runs + 1):  # the first run of each question warms up
                    out = json.loads(
                        rlens(
                            "run",
                            str(root / name),
                            "--image",
                            str(image),
                            "--prompt",
                            question,
                            "--max-new-tokens",
                            "1",
                            "--json",
                        )
                    )
                    ttft.append(out["ttft_ms"])
                    visual.append(out["num_visual_tokens"])
                ttft.pop(-args.runs - 1)
            rows[name] = (statistics.median(ttft), statistics.mean(visual))
        print(
            json.dumps(
                {name: {"median_ttft_ms": t, "mean_visual_tokens": v} for name, (t, v) in rows.items()}
            )
        )
        base = rows["plain"][0]
        for name, (t, v) in rows.items():
            print(f"{name:6s} visual tokens {v:6.1f}   median TTFT {t:7.1f} ms   ({t / base:.2f}x)")


if __name__ == "__main__":
    main()
