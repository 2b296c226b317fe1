"""Session-wide fixtures: tiny checkpoints and their exported artifacts, built once and shared.

Exports go through the CLI (``rlens export``), as a user would run it. Three checkpoints cover the
supported text backbones and the attention variants: LLaMA with GQA, Mistral with a sliding window
shorter than the prompts, Qwen2 with q/k/v biases.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlens.cli.main import main as rlens_main
from rlens.tiny import TinySpec, make_tiny_llava

SPECS = {
    "llama": TinySpec(backbone="llama", num_layers=3, num_heads=4, num_kv_heads=2, seed=1),
    "mistral": TinySpec(
        backbone="mistral", num_layers=2, num_heads=4, num_kv_heads=1, sliding_window=12, seed=2
    ),
    "qwen2": TinySpec(backbone="qwen2", num_layers=2, num_heads=4, num_kv_heads=4, seed=3),
}

REDUCTION_FLAGS = [
    *("--hollow-layers", "0,1", "--hollow-window", "4"),
    *("--ffn-layers", "1,", "--ffn-keep", "0.25", "--probe-every", "4"),
]
"""``reduced_trim``'s reductions: Hollow Attention on both llama layers, PAD-FFN on the second."""


@dataclass(frozen=True)
class Exported:
    backbone: str
    checkpoint: Path
    artifact: Path


def make_image(seed: int, size: tuple[int, int] = (40, 52)) -> Image.Image:
    """A deterministic noise picture (not square, so resizing and cropping matter)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices: one torch thread is faster, and immune to the other core being busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("exported")
    result = {}
    for name, spec in SPECS.items():
        checkpoint = make_tiny_llava(root / f"{name}-checkpoint", spec)
        artifact = root / f"{name}-artifact"
        assert rlens_main(["export", str(checkpoint), "-o", str(artifact), "--quiet"]) == 0
        result[name] = Exported(name, checkpoint, artifact)
    return result


@pytest.fixture(scope="session")
def reduced_trim(exported: dict[str, Exported], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama checkpoint with Hollow Attention, PAD-FFN and TRIM: every graph kind rlens writes,
    and a decoder that takes the span inputs."""
    from rlens.tiny import make_tiny_clip

    root = tmp_path_factory.mktemp("reduced-trim")
    clip = make_tiny_clip(root / "clip", exported["llama"].checkpoint)
    out = root / "reduced-trim"
    flags = [*REDUCTION_FLAGS, "--clip-model", str(clip)]
    assert rlens_main(["export", str(exported["llama"].checkpoint), "-o", str(out), "-q", *flags]) == 0
    return out


@pytest.fixture(scope="session")
def quantized(
    exported: dict[str, Exported], reduced_trim: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The llama checkpoint at ``--precision int8`` (unreduced, beside ``exported["llama"]``) and at
    ``int4`` with ``reduced_trim``'s reductions (PAD-FFN gathers rows of weights it also quantizes);
    both validated with their precision's default tolerance."""
    root = tmp_path_factory.mktemp("quantized")
    checkpoint = str(exported["llama"].checkpoint)
    assert rlens_main(["export", checkpoint, "-o", str(root / "int8"), "-q", "--precision", "int8"]) == 0
    flags = [*REDUCTION_FLAGS, "--clip-model", str(reduced_trim.parent / "clip"), "--precision", "int4"]
    assert rlens_main(["export", checkpoint, "-o", str(root / "int4"), "-q", *flags]) == 0
    return {"int8": root / "int8", "int4": root / "int4"}


@pytest.fixture(scope="session")
def toy_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped toy model, exported unreduced as the README's quickstart does."""
    artifact = tmp_path_factory.mktemp("toy") / "toy-rlens"
    assert rlens_main(["export", "toy", "-o", str(artifact), "--quiet"]) == 0
    return artifact


@pytest.fixture(scope="session")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "picture.png"
    make_image(7).save(path)
    return path
