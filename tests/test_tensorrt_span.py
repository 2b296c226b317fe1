"""The TensorRT track's reduced decoder: the visual span reaches it as an input's shape, not values.

``rlens export --target tensorrt`` writes a decoder whose start column and span width are the shape
of ``visual_span`` [visual_start, visual_width], so no input value decides a size and TensorRT
needs no shape-tensor input. Without TensorRT the export stops after the graphs, which is all
these tests need: the graphs pass the static check without notes, and answer exactly as the ONNX
Runtime track's decoder does, on ONNX Runtime and on the (fake) engines.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import Exported
from test_tensorrt_runtime import fake_build, machine, on_engines  # noqa: F401 (machine: a fixture)

from rlens.cli.main import main as rlens_main
from rlens.manifest import read_manifest
from rlens.runtime.pipeline import Pipeline
from rlens.tensorrt.check import check_artifact
from rlens.tensorrt.support import parse_target

REDUCTIONS = ["--hollow-layers", "0,1", "--hollow-window", "4", "--ffn-layers", "1,", "--ffn-keep", "0.25"]


@pytest.fixture(scope="module")
def tracks(exported: dict[str, Exported], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same reduced llama export for ONNX Runtime and for TensorRT (graphs only: no GPU here)."""
    root, checkpoint = tmp_path_factory.mktemp("span"), str(exported["llama"].checkpoint)
    ort_track, trt_track = root / "ort", root / "trt"
    assert rlens_main(["export", checkpoint, "-o", str(ort_track), "-q", *REDUCTIONS]) == 0
    rlens_main(["export", checkpoint, "-o", str(trt_track), "-q", "--target", "tensorrt", *REDUCTIONS])
    assert (trt_track / "rlens.json").is_file()  # the graphs are complete before the engine build stops
    return {"onnxruntime": ort_track, "tensorrt": trt_track}


def test_only_the_tensorrt_track_reads_the_span_from_a_shape(tracks: dict[str, Path]) -> None:
    names = {
        track: {t.name for t in read_manifest(path).graphs["decoder"].inputs}
        for track, path in tracks.items()
    }
    assert {"visual_start", "visual_lengths"} <= names["onnxruntime"] and "visual_span" not in names[
        "onnxruntime"
    ]
    assert {"visual_span", "visual_lengths"} <= names["tensorrt"] and "visual_start" not in names["tensorrt"]
    report = check_artifact(tracks["tensorrt"], parse_target("10.15"))
    assert report.ok, [p.line() for p in report.problems]
    decoder = next(g for g in report.graphs if g.name == "decoder")
    assert decoder.notes == []  # no size depends on an input's values any more


def test_both_tracks_answer_alike(tracks: dict[str, Path], image_file: Path) -> None:
    images, prompts = [image_file, None], ["What is in the picture?", "Say something long"]
    answers = {
        track: [r.token_ids for r in Pipeline.load(path).generate_batch(images, prompts, 12)]
        for track, path in tracks.items()
    }
    assert answers["tensorrt"] == answers["onnxruntime"]


@pytest.mark.usefixtures("machine")
def test_the_tensorrt_track_on_engines(tracks: dict[str, Path], image_file: Path, tmp_path: Path) -> None:
    artifact = fake_build(Path(shutil.copytree(tracks["tensorrt"], tmp_path / "trt")))
    expected = Pipeline.load(artifact).generate(image_file, "What is in the picture?", 12)
    actual = on_engines(artifact, torch.device("cpu")).generate(image_file, "What is in the picture?", 12)
    assert actual.token_ids == expected.token_ids
