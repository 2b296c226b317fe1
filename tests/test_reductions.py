"""Hollow Attention and PAD-FFN in the exported decoder against the PyTorch reference of each.

Every configuration is exported through the CLI (as a user would), then the runtime's prefill
logits are compared with ``ReducedDecoder`` (the reference, itself checked against transformers
in test_reference.py) within 1e-4 relative, and greedy generation must give the same tokens.
Windows below and above the 16 visual tokens, keep ratios 0, 0.2 and 1, several layer sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Exported, make_image
from transformers import LlavaForConditionalGeneration

from rlens.cli.main import main as rlens_main
from rlens.exporter.reference import ReducedDecoder, ReferenceInputs
from rlens.manifest import read_manifest
from rlens.reductions import Reductions
from rlens.runtime.pipeline import Pipeline, batch_layout
from rlens.runtime.preprocess import preprocess


@dataclass(frozen=True)
class Case:
    backbone: str
    hollow: str
    window: int
    ffn: str
    keep: float
    probe_every: int

    @property
    def reductions(self) -> Reductions:
        def layers(spec: str) -> tuple[int, ...]:
            return tuple(int(i) for i in spec.split(",") if i)

        return Reductions(layers(self.hollow), self.window, layers(self.ffn), self.keep, self.probe_every)


CASES = {
    "llama-window5-keep0.2": Case("llama", "0,2", 5, "1,", 0.2, 4),
    "mistral-window100-skip": Case("mistral", "0,1", 100, "0,1", 0.0, 10),
    "qwen2-window1-keep1": Case("qwen2", "0,", 1, "0,1", 1.0, 3),
    "llama-all-layers-window16-keep0.5": Case("llama", "0,1,2", 16, "0,1,2", 0.5, 2),
}


@cache
def reference_model(checkpoint: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def run_export(checkpoint: Path, out: Path, *flags: str) -> int:
    """``rlens export CHECKPOINT -o OUT -q FLAGS...`` through the CLI entry point."""
    return rlens_main(["export", str(checkpoint), "-o", str(out), "-q", *flags])


def export(exported: dict[str, Exported], case: Case, out: Path) -> Path:
    flags = {
        "--hollow-layers": case.hollow,
        "--hollow-window": str(case.window),
        "--ffn-layers": case.ffn,
        "--ffn-keep": str(case.keep),
        "--probe-every": str(case.probe_every),
    }
    assert run_export(exported[case.backbone].checkpoint, out, *(x for kv in flags.items() for x in kv)) == 0
    return out


@pytest.fixture(scope="module", params=list(CASES))
def reduced(
    request: pytest.FixtureRequest, exported: dict[str, Exported], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Case, Pipeline, ReducedDecoder]:
    case = CASES[request.param]
    artifact = export(exported, case, tmp_path_factory.mktemp("reduced") / request.param)
    model = reference_model(exported[case.backbone].checkpoint)
    return case, Pipeline.load(artifact), ReducedDecoder(model, case.reductions)


def runtime_inputs(
    pipeline: Pipeline, images: list, questions: list[str]
) -> tuple[list[list[int]], np.ndarray, ReferenceInputs]:
    """The runtime's own batch layout and embeddings, handed to the reference unchanged."""
    ids, features, _ = pipeline.encode_prompts(images, questions)
    m = pipeline.manifest
    tokens, mask, span = batch_layout(ids, m.model.image_token_id, m.tokenizer.pad_token_id)
    embeds = pipeline.embed(tokens, features)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    ref = ReferenceInputs(
        torch.from_numpy(embeds),
        torch.from_numpy(mask),
        torch.from_numpy(positions),
        span.start,
        span.lengths,
    )
    return ids, features, ref


def test_manifest_records_the_reductions(reduced: tuple[Case, Pipeline, ReducedDecoder]) -> None:
    case, pipeline, _ = reduced
    manifest = read_manifest(pipeline.artifact_dir)
    assert manifest.reductions == case.reductions
    assert {t.name for t in manifest.graphs["decoder"].inputs} >= {"visual_start", "visual_lengths"}
    assert manifest.validation is not None and manifest.validation.prefill_logits_max_diff < 1e-4
    assert manifest.cost is not None
    assert manifest.cost.reduced["decoder"] < manifest.cost.unreduced["decoder"] or case.keep == 1.0


def test_prefill_logits_equal_the_reference(reduced: tuple[Case, Pipeline, ReducedDecoder]) -> None:
    _, pipeline, decoder = reduced
    images = [make_image(51), make_image(52, (30, 70))]
    questions = ["What is in the top left corner?", "Count the shapes, please, and name their colours."]
    ids, features, ref = runtime_inputs(pipeline, images, questions)
    logits, _ = pipeline.prefill(ids, features)
    with torch.no_grad():
        expected = decoder.logits(ref).numpy()
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert error < 1e-4, error
    # each row as if alone
    alone, _ = pipeline.prefill(ids[1:], pipeline.encode_images(images[1:])[0])
    assert np.abs(alone[0] - logits[1]).max() / np.abs(logits[1]).max() < 1e-4


def test_greedy_generation_equals_the_reference(reduced: tuple[Case, Pipeline, ReducedDecoder]) -> None:
    _, pipeline, decoder = reduced
    image, question = make_image(61), "Describe the picture in a few words."
    result = pipeline.generate(image, question, max_new_tokens=20)
    pixels = torch.from_numpy(preprocess(image, pipeline.image_config))
    with torch.no_grad():
        expected = decoder.generate(
            torch.tensor([result.prompt_ids]), pixels, 20, pipeline.manifest.generation.eos_token_ids
        )
    assert len(result.token_ids) >= 10
    assert result.token_ids == expected


def test_the_reductions_change_the_logits(
    reduced: tuple[Case, Pipeline, ReducedDecoder], exported: dict[str, Exported]
) -> None:
    case, pipeline, _ = reduced
    plain = Pipeline.load(exported[case.backbone].artifact)
    image = make_image(71)
    # short: Mistral's 12-token sliding window must still reach the image from the last token
    ids, features, _ = pipeline.encode_prompts([image], ["Colour?"])
    reduced_logits, _ = pipeline.prefill(ids, features)
    plain_logits, _ = plain.prefill(ids, features)
    assert np.abs(reduced_logits - plain_logits).max() > 1e-3


def test_window_above_v_and_keep_1_reproduce_the_unreduced_model(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    case = Case("llama", "0,1,2", 16, "0,1,2", 1.0, 10)  # V = 16 visual tokens
    pipeline = Pipeline.load(export(exported, case, tmp_path / "exact"))
    plain = Pipeline.load(exported["llama"].artifact)
    image, question = make_image(81), "What is in the picture?"
    ids, features, _ = pipeline.encode_prompts([image], [question])
    np.testing.assert_allclose(
        pipeline.prefill(ids, features)[0], plain.prefill(ids, features)[0], rtol=1e-4, atol=1e-5
    )
    assert pipeline.generate(image, question, 24).token_ids == plain.generate(image, question, 24).token_ids


def test_a_count_without_a_ranking_is_refused(
    exported: dict[str, Exported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_export(exported["llama"].checkpoint, tmp_path / "x", "--hollow-layers", "2") == 1
    assert "needs a ranking" in capsys.readouterr().err
    assert run_export(exported["llama"].checkpoint, tmp_path / "x", "--ffn-layers", "0,7") == 1
    assert "layers 0..2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_with_a_ranking_takes_its_prefix(exported: dict[str, Exported], tmp_path: Path) -> None:
    ranking = {
        "version": 1,
        "num_layers": 3,
        "complete": True,
        "fingerprint": {},
        "parameters": {"hollow_window": 4, "ffn_keep": 0.2, "probe_every": 10},
        "hollow": {"order": [2, 0, 1], "scores": [0.0, 0.1, 0.2]},
        "ffn": {"order": [1, 2, 0], "scores": [0.0, 0.1, 0.2]},
    }
    (tmp_path / "ranking.json").write_text(json.dumps(ranking))
    out = tmp_path / "ranked"
    flags = ["--ranking", str(tmp_path / "ranking.json"), "--hollow-layers", "2", "--ffn-layers", "1"]
    assert run_export(exported["llama"].checkpoint, out, *flags, "--hollow-window", "4") == 0
    r = read_manifest(out).reductions
    assert (r.hollow_layers, r.ffn_layers) == ((2, 0), (1,))


def test_export_with_calib_ranks_then_exports(exported: dict[str, Exported], tmp_path: Path) -> None:
    for i in range(2):
        make_image(90 + i).save(tmp_path / f"calib{i}.png")
    (tmp_path / "calib.jsonl").write_text(
        '{"image": "calib0.png", "prompt": "What is in the picture?", "answer": "A red circle."}\n'
        '{"image": "calib1.png", "prompt": "Colour?"}\n'
    )
    out = tmp_path / "ranked"
    flags = ["--calib", str(tmp_path / "calib.jsonl"), "--hollow-layers", "1", "--ffn-layers", "2"]
    assert run_export(exported["llama"].checkpoint, out, *flags, "--hollow-window", "4") == 0
    ranking = json.loads((out / "ranking.json").read_text())
    r = read_manifest(out).reductions
    assert r.hollow_layers == tuple(ranking["hollow"]["order"][:1])
    assert r.ffn_layers == tuple(ranking["ffn"]["order"][:2])
    assert r.ranking == "ranking.json"
