"""On a machine with an NVIDIA GPU and TensorRT: build engines, run them, get the CPU pipeline's tokens.

Issue 6's "done when": ``rlens export --target tensorrt`` builds the engines of the tiny and the toy
exports, and the pipeline on those engines answers with the CPU pipeline's greedy tokens. Skipped,
with the reason, where the tensorrt package, an NVIDIA GPU or a CUDA build of torch is missing (CI
and the build machines: ``tests/test_tensorrt_runtime.py`` covers the same plumbing there with a
fake TensorRT). The reduced decoder and TRIM are expected to fail until the span inputs reach the
TensorRT track as shapes (the last step of issue 6); their tests say so instead of hiding it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import Exported
from test_tensorrt_runtime import on_engines

from rlens.cli.main import main as rlens_main
from rlens.errors import RlensError
from rlens.manifest import read_manifest, write_manifest
from rlens.runtime.pipeline import Pipeline
from rlens.tensorrt.engines import missing_requirement
from rlens.tensorrt.runtime import Engines


def _missing() -> str | None:
    missing = missing_requirement()
    if missing is None and not torch.cuda.is_available():
        missing = f"this torch ({torch.__version__}) has no CUDA device for the engines' buffers"
    return missing


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"TensorRT engines need a GPU: {MISSING}")

TOY_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "toy.png"
SPAN_PENDING = pytest.mark.xfail(
    reason="the reduced decoder and TRIM still set sizes from input values; TensorRT wants shape inputs",
    strict=False,
)


def export_with_engines(checkpoint: str, out: Path, *flags: str) -> Path:
    assert rlens_main(["export", checkpoint, "-o", str(out), "-q", "--target", "tensorrt", *flags]) == 0
    manifest = read_manifest(out)
    assert manifest.tensorrt is not None
    assert all((out / f).is_file() for f in manifest.tensorrt.engines.values())
    return out


def assert_same_tokens(artifact: Path, images: list, prompts: list[str], max_new: int = 16) -> None:
    expected = Pipeline.load(artifact, provider="cpu").generate_batch(images, prompts, max_new)
    actual = on_engines(artifact, torch.device("cuda")).generate_batch(images, prompts, max_new)
    assert [r.token_ids for r in actual] == [r.token_ids for r in expected]


def test_tiny_engines_match_the_cpu_pipeline(
    exported: dict[str, Exported], tmp_path: Path, image_file: Path
) -> None:
    artifact = export_with_engines(str(exported["llama"].checkpoint), tmp_path / "tiny", "--max-batch", "2")
    assert_same_tokens(artifact, [image_file], ["What is in the picture?"])
    assert_same_tokens(artifact, [image_file, None], ["What is in the picture?", "Say something"])


def test_toy_engines_match_the_cpu_pipeline(tmp_path: Path) -> None:
    artifact = export_with_engines("toy", tmp_path / "toy-rlens")
    questions = ["How many objects are there?", "Is there a blue star?"]
    for question in questions:
        assert_same_tokens(artifact, [TOY_IMAGE], [question], max_new=8)


def test_engines_from_another_tensorrt_release_are_refused_then_rebuilt(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    flags = ["--max-batch", "2", "--max-context", "96"]  # not the defaults: the rebuild must keep them
    artifact = export_with_engines(str(exported["mistral"].checkpoint), tmp_path / "tiny", *flags)
    manifest = read_manifest(artifact)
    assert manifest.tensorrt is not None
    write_manifest(replace(manifest, tensorrt=replace(manifest.tensorrt, version="9.0.0.0")), artifact)
    with pytest.raises(RlensError, match=r"built with TensorRT 9\.0\.0\.0.*`rlens engines "):
        Engines(artifact, read_manifest(artifact))
    # what the message says to do: rebuild from the graphs alone, then the engines load and answer
    assert rlens_main(["engines", str(artifact), "-q"]) == 0
    assert read_manifest(artifact).tensorrt == manifest.tensorrt
    assert_same_tokens(artifact, [TOY_IMAGE], ["What is in the picture?"])


@SPAN_PENDING
def test_reduced_engines_match_the_cpu_pipeline(
    exported: dict[str, Exported], tmp_path: Path, image_file: Path
) -> None:
    flags = ["--hollow-layers", "0,1", "--hollow-window", "4", "--ffn-layers", "1,", "--ffn-keep", "0.25"]
    artifact = export_with_engines(str(exported["llama"].checkpoint), tmp_path / "reduced", *flags)
    assert_same_tokens(artifact, [image_file], ["What is in the picture?"])


@SPAN_PENDING
def test_trim_engines_match_the_cpu_pipeline(
    exported: dict[str, Exported], tmp_path: Path, image_file: Path
) -> None:
    from rlens.tiny import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip", exported["llama"].checkpoint)
    artifact = export_with_engines(
        str(exported["llama"].checkpoint), tmp_path / "trim", "--clip-model", str(clip)
    )
    assert_same_tokens(artifact, [image_file], ["What is in the picture?"])
