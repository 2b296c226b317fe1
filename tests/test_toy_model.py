"""The shipped toy model (rlens/toy/weights, trained by tools/train_toy.py): it loads, it fits the size
budget, the README's quickstart answers right, the exported pipeline answers held-out questions, the
shipped ranking beats its reverse, its graphs pass the TensorRT check, and `rlens export toy` uses
the ranking shipped with it.

Accuracy is measured on small held-out sets here (the README's figures use 1,000 questions and
tools/toy_evidence.py), with bounds well below the measured figures so the tests check behaviour, not
noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlens import toy
from rlens.cli.main import main as rlens_main
from rlens.eval import evaluate_artifact
from rlens.exporter.layer_ranking import read_ranking
from rlens.manifest import read_manifest
from rlens.tensorrt.check import check_artifact
from rlens.tensorrt.engines import missing_requirement
from rlens.tensorrt.support import parse_target
from rlens.toy.data import toy_set, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "toy.png"
EXAMPLE_PROMPT = "How many blue objects are there?"
EXAMPLE_ANSWER = "2"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 held-out questions (20 per kind), seed 0: the first of the README's 1,000."""
    path = tmp_path_factory.mktemp("toy-eval") / "data.jsonl"
    return write_jsonl(toy_set(120, seed=0), path)


def test_checkpoints_load_and_fit_the_size_budget() -> None:
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

    files = [p for p in toy.WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    llava = LlavaForConditionalGeneration.from_pretrained(toy.resolve("toy", "llava"))
    clip = CLIPModel.from_pretrained(toy.resolve("toy", "clip"))
    processor = AutoProcessor.from_pretrained(toy.resolve("toy", "llava"))
    AutoTokenizer.from_pretrained(toy.resolve("toy", "clip"))
    text = llava.config.text_config
    assert text.model_type == "llama" and text.num_hidden_layers >= 8
    assert llava.config.image_seq_length >= 144
    assert len(processor.tokenizer) == text.vocab_size < 1000  # its own tokenizer, not a hub one
    tower = llava.model.vision_tower.state_dict()
    for name, tensor in clip.vision_model.state_dict().items():  # TRIM needs the same tower
        assert (tower[name] == tensor).all(), name


def test_quickstart_answers_the_readme_question(toy_artifact: Path) -> None:
    command = ["run", str(toy_artifact), "--image", str(EXAMPLE), "--prompt", EXAMPLE_PROMPT, "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "rlens.cli.main", *command],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["text"].strip() == EXAMPLE_ANSWER


def test_unreduced_pipeline_answers_held_out_questions(toy_artifact: Path, held_out: Path) -> None:
    """The shipped model answers 92.5% of the README's 1,000 (every kind 80-100%); on these 120 the
    bounds sit well under that, far above every answer prior."""
    report = evaluate_artifact(toy_artifact, held_out, batch_size=20)
    assert report.accuracy >= 0.8, report.to_json()
    for kind in ("colour", "shape", "exists", "position"):
        assert report.per_kind[kind].accuracy >= 0.8, (kind, report.to_json())
    for kind in ("count", "relative"):
        assert report.per_kind[kind].accuracy >= 0.6, (kind, report.to_json())
    assert report.mean_visual_tokens == 145


@pytest.mark.parametrize("reduction", ["hollow", "ffn"])
def test_ranked_order_beats_the_reverse_at_half_the_layers(reduction: str, tmp_path: Path) -> None:
    """Issue 8's evidence as a test: with 4 of the 8 layers reduced (the README's budget: window 1,
    keep 0.02), the shipped ranking's first 4 layers keep more accuracy than its last 4 on 300 held-out
    questions (README: 94.7% against 86.3% for Hollow Attention, 94.7% against 90.0% for PAD-FFN)."""
    data = write_jsonl(toy_set(300, seed=0), tmp_path / "eval" / "data.jsonl")
    ranking = read_ranking(toy.resolve("toy") / "ranking.json")
    order = ranking.hollow_order if reduction == "hollow" else ranking.ffn_order
    half = len(order) // 2
    accuracy = {}
    for name, layers in (("ranked", order[:half]), ("reverse", order[::-1][:half])):
        out = tmp_path / name
        flags = ["--hollow-window", "1", "--ffn-keep", "0.02", "--probe-every", "10", "--quiet"]
        flags += [f"--{reduction}-layers", ",".join(map(str, layers))]
        assert rlens_main(["export", "toy", "-o", str(out), *flags]) == 0
        accuracy[name] = evaluate_artifact(out, data, batch_size=20).accuracy
    assert accuracy["ranked"] > accuracy["reverse"] + 0.03, accuracy


def test_toy_graphs_pass_the_tensorrt_check(toy_artifact: Path, tmp_path: Path) -> None:
    report = check_artifact(toy_artifact, parse_target("10.15"))
    assert report.ok, [p.line() for p in report.problems]
    # what a TensorRT deployment exports: fp16, the ranked reductions, TRIM, the span read from a shape
    out = tmp_path / "toy-trt16"
    flags = ["--precision", "fp16", "--hollow-layers", "4", "--ffn-layers", "4", "--clip-model", "toy", "-q"]
    code = rlens_main(["export", "toy", "-o", str(out), *flags, "--target", "tensorrt"])
    assert code == (0 if missing_requirement() is None else 1)  # no engines without TensorRT and a GPU
    report = check_artifact(out, parse_target("10.15"))
    assert report.ok and not any(g.notes for g in report.graphs), [p.line() for p in report.problems]
    assert {g.name for g in report.graphs} == {"vision", "embedding", "decoder", "trim"}


def test_export_toy_uses_the_shipped_ranking(tmp_path: Path) -> None:
    out = tmp_path / "ffn2"
    assert rlens_main(["export", "toy", "-o", str(out), "--ffn-layers", "2", "--quiet"]) == 0
    ranking = read_ranking(toy.resolve("toy") / "ranking.json")
    reductions = read_manifest(out).reductions
    assert sorted(reductions.ffn_layers) == sorted(ranking.ffn_order[:2])
    assert reductions.ranking is not None and reductions.ranking.endswith("ranking.json")
