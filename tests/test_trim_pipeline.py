"""TRIM end to end: exported with --clip-model, run by the runtime, against PyTorch.

The reference pipeline is transformers' own: ``trim_reference`` (transformers' towers and
numpy's percentiles) picks the tokens, then the LLaVA language model generates from embeddings
with exactly those features in place of the image tokens.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Exported, make_image
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from rlens.cli.main import main as rlens_main
from rlens.exporter.reference import ReducedDecoder, ReferenceInputs
from rlens.exporter.trim_reference import trim_reference
from rlens.manifest import read_manifest
from rlens.runtime.pipeline import Pipeline, batch_layout
from rlens.runtime.preprocess import preprocess
from rlens.tiny import make_tiny_clip

NEW_TOKENS = 20


@cache
def models(checkpoint: Path, clip_dir: Path) -> tuple[LlavaForConditionalGeneration, object]:
    from rlens.exporter.clip import load_clip

    return LlavaForConditionalGeneration.from_pretrained(checkpoint).eval(), load_clip(clip_dir)


@pytest.fixture(scope="module")
def clip_dir(exported: dict[str, Exported], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", exported["llama"].checkpoint)


def export(exported: dict[str, Exported], out: Path, *flags: str) -> int:
    return rlens_main(["export", str(exported["llama"].checkpoint), "-o", str(out), "-q", *flags])


@pytest.fixture(scope="module")
def trimmed(
    exported: dict[str, Exported], clip_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Pipeline:
    out = tmp_path_factory.mktemp("trim") / "low-iqr"
    assert export(exported, out, "--clip-model", str(clip_dir), "--trim-select", "low") == 0
    return Pipeline.load(out)


def reference_tokens(
    pipeline: Pipeline, checkpoint: Path, clip_dir: Path, image: object, question: str
) -> tuple[list[int], list[int]]:
    """TRIM in PyTorch, then transformers' generate from the embeddings: (prompt ids, new tokens)."""
    model, clip = models(checkpoint, clip_dir)
    t = pipeline.manifest.trim
    assert t is not None and pipeline.instructions is not None
    ids, mask = pipeline.instructions.encode([question])
    pixels = torch.from_numpy(preprocess(image, pipeline.image_config))
    with torch.no_grad():
        ((_, features),) = trim_reference(
            model, clip, pixels, torch.from_numpy(ids), torch.from_numpy(mask), t.select, t.mode, t.ratio
        )
        prompt = pipeline.prompts.encode(question, len(features))
        input_ids = torch.tensor([prompt])
        embeds = model.get_input_embeddings()(input_ids.clamp(max=model.config.text_config.vocab_size - 1))
        embeds[input_ids == model.config.image_token_id] = features
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    tokens = out[0].tolist()
    eos = set(pipeline.manifest.generation.eos_token_ids)
    cut = next((i + 1 for i, tok in enumerate(tokens) if tok in eos), len(tokens))
    return prompt, tokens[:cut]


def test_trim_keeps_fewer_tokens_and_lays_them_out(trimmed: Pipeline, image_file: Path) -> None:
    result = trimmed.generate(str(image_file), "What colour is the circle?", max_new_tokens=4)
    v = trimmed.manifest.model.num_visual_tokens
    assert 1 <= result.num_visual_tokens < v
    assert result.prompt_ids.count(trimmed.manifest.model.image_token_id) == result.num_visual_tokens
    assert read_manifest(trimmed.artifact_dir).validation.trim_features_max_diff < 1e-4


def test_greedy_tokens_equal_the_pytorch_trim_pipeline(
    trimmed: Pipeline, exported: dict[str, Exported], clip_dir: Path
) -> None:
    for seed, question in [(1, "Where is the red circle?"), (2, "How many shapes are there?")]:
        image = make_image(seed)
        prompt, expected = reference_tokens(trimmed, exported["llama"].checkpoint, clip_dir, image, question)
        result = trimmed.generate(image, question, max_new_tokens=NEW_TOKENS)
        assert result.prompt_ids == prompt
        assert result.token_ids == expected


def test_batch_rows_with_different_counts_answer_as_alone(trimmed: Pipeline) -> None:
    candidates = [
        (make_image(s, (40 + 5 * s, 50)), q)
        for s in range(3, 9)
        for q in ("Is there a blue square?", "Describe the picture.")
    ]
    counts = [trimmed.encode_prompts([im], [q])[2][0] for im, q in candidates]
    first = candidates[0]
    second = next((c for c, n in zip(candidates, counts, strict=True) if n != counts[0]), None)
    assert second is not None, "no two candidates with different TRIM counts"
    pairs = [first, second]
    batch = trimmed.generate_batch([p[0] for p in pairs], [p[1] for p in pairs], max_new_tokens=NEW_TOKENS)
    alone = [trimmed.generate(im, q, max_new_tokens=NEW_TOKENS) for im, q in pairs]
    assert batch[0].num_visual_tokens != batch[1].num_visual_tokens
    assert [r.num_visual_tokens for r in batch] == [r.num_visual_tokens for r in alone]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]


def test_ratio_mode_keeps_a_fixed_count(
    exported: dict[str, Exported], clip_dir: Path, tmp_path: Path
) -> None:
    assert export(exported, tmp_path / "ratio", "--clip-model", str(clip_dir), "--trim", "ratio:0.25") == 0
    pipeline = Pipeline.load(tmp_path / "ratio")
    assert pipeline.manifest.trim is not None and pipeline.manifest.trim.mode == "ratio"
    counts = [
        pipeline.generate(make_image(s), "Any shapes?", max_new_tokens=1).num_visual_tokens for s in (5, 6)
    ]
    assert counts == [5, 5]  # round(0.25 * 16) kept + the merged token


def test_long_instructions_are_truncated_with_a_warning(
    trimmed: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    question = " ".join(["what", "colour", "is", "the", "circle"] * 30)
    with caplog.at_level(logging.WARNING, logger="rlens"):
        result = trimmed.generate(make_image(7), question, max_new_tokens=2)
    assert "longer than CLIP's 77 tokens" in caplog.text
    assert result.num_visual_tokens >= 1
    ids, mask = trimmed.instructions.encode([question, ""])
    assert ids.shape[1] == 77 and mask[1].sum() == 2  # an empty instruction is start + end of text


def test_a_clip_with_another_vision_tower_is_refused(
    exported: dict[str, Exported], clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    other = tmp_path / "other-clip"
    shutil.copytree(clip_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if "vision_model.encoder.layers.0.mlp.fc1.weight" in k)
    weights[name] = weights[name] + 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert export(exported, tmp_path / "out", "--clip-model", str(other)) == 1
    assert "vision tower differs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert export(exported, tmp_path / "out", "--trim", "iqr") == 1
    assert "needs --clip-model" in capsys.readouterr().err


def test_trim_composes_with_the_decoder_reductions(
    exported: dict[str, Exported], clip_dir: Path, tmp_path: Path
) -> None:
    flags = [
        "--clip-model",
        str(clip_dir),
        "--trim-select",
        "low",
        "--hollow-layers",
        "0,1",
        "--hollow-window",
        "3",
        "--ffn-layers",
        "1,2",
        "--ffn-keep",
        "0.25",
        "--probe-every",
        "2",
    ]
    assert export(exported, tmp_path / "both", *flags) == 0
    pipeline = Pipeline.load(tmp_path / "both")
    images = [make_image(8), make_image(9, (30, 60))]
    questions = ["Which shape is red?", "Count the squares in the picture, please."]
    ids, features, counts = pipeline.encode_prompts(images, questions)
    assert all(1 <= n < 16 for n in counts)
    logits, _ = pipeline.prefill(ids, features)
    m = pipeline.manifest
    tokens, mask, span = batch_layout(ids, m.model.image_token_id, m.tokenizer.pad_token_id)
    assert span.lengths == counts
    ref = ReferenceInputs(
        torch.from_numpy(pipeline.embed(tokens, features)),
        torch.from_numpy(mask),
        torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)),
        span.start,
        span.lengths,
    )
    model, _ = models(exported["llama"].checkpoint, clip_dir)
    with torch.no_grad():
        expected = ReducedDecoder(model, m.reductions).logits(ref).numpy()
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4
