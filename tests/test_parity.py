"""The exported pipeline against transformers, the reference nobody here wrote.

Greedy tokens must be identical to ``LlavaForConditionalGeneration.generate(do_sample=False)`` for at
least 20 new tokens, and prefill logits equal within 1e-4 relative, on every backbone, batch 1
and 2 (different prompt lengths, left padding), with text before and after the image.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SPECS, Exported, make_image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rlens.runtime.pipeline import Pipeline

NEW_TOKENS = 24


@cache
def reference(checkpoint: Path) -> tuple[LlavaForConditionalGeneration, object]:
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    return model, processor


def hf_inputs(processor: object, images: list, contents: list[list[dict]]) -> dict[str, torch.Tensor]:
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
        )
        for c in contents
    ]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def image_then(question: str) -> list[dict]:
    return [{"type": "image"}, {"type": "text", "text": question}]


def hf_generate(model: LlavaForConditionalGeneration, inputs: dict) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    trimmed = []
    for row in new:  # transformers pads finished rows; the runtime stops at EOS
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        trimmed.append(row[:cut])
    return trimmed


@pytest.fixture(scope="module", params=list(SPECS))
def case(request: pytest.FixtureRequest, exported: dict[str, Exported]) -> tuple[Exported, Pipeline]:
    e = exported[request.param]
    return e, Pipeline.load(e.artifact)


def test_greedy_tokens_equal_transformers(case: tuple[Exported, Pipeline]) -> None:
    e, pipeline = case
    model, processor = reference(e.checkpoint)
    image = make_image(11)
    question = "What shapes are in the picture and what colour is each?"
    inputs = hf_inputs(processor, [image], [image_then(question)])
    expected = hf_generate(model, inputs)[0]
    result = pipeline.generate(image, question, max_new_tokens=NEW_TOKENS)
    assert result.prompt_ids == inputs["input_ids"][0].tolist()
    assert result.num_visual_tokens == SPECS[e.backbone].num_image_tokens
    assert len(result.token_ids) >= 20, "pick a seed whose greedy answer does not hit EOS early"
    assert result.token_ids == expected
    assert result.text == processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_prefill_logits_within_1e4(case: tuple[Exported, Pipeline]) -> None:
    e, pipeline = case
    model, processor = reference(e.checkpoint)
    image = make_image(12)
    inputs = hf_inputs(processor, [image], [image_then("Describe the image.")])
    with torch.no_grad():
        expected = model(**inputs).logits[0, -1].numpy()
    ids = inputs["input_ids"][0].tolist()
    logits, _ = pipeline.prefill([ids], pipeline.encode_images([image])[0])
    error = np.abs(logits[0] - expected).max() / np.abs(expected).max()
    assert error < 1e-4, error


def test_batch_of_two_equals_transformers_and_each_alone(case: tuple[Exported, Pipeline]) -> None:
    e, pipeline = case
    model, processor = reference(e.checkpoint)
    images = [make_image(21), make_image(22, (60, 30))]
    questions = ["Is there a circle?", "How many squares are there in the top left corner of this image?"]
    inputs = hf_inputs(processor, images, [image_then(q) for q in questions])
    expected = hf_generate(model, inputs)
    batch = pipeline.generate_batch(images, questions, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in batch] == expected
    alone = [
        pipeline.generate(im, q, max_new_tokens=NEW_TOKENS).token_ids
        for im, q in zip(images, questions, strict=True)
    ]
    assert alone == expected


def test_text_before_and_after_the_image(case: tuple[Exported, Pipeline]) -> None:
    e, pipeline = case
    model, processor = reference(e.checkpoint)
    image = make_image(31)
    content = [
        {"type": "text", "text": "Look at this picture: "},
        {"type": "image"},
        {"type": "text", "text": " Which shape is largest?"},
    ]
    inputs = hf_inputs(processor, [image], [content])
    expected = hf_generate(model, inputs)[0]
    # the tiny chat template writes an image item as "<image>\n"; a user placing it writes the same
    result = pipeline.generate(
        image, "Look at this picture: <image>\n Which shape is largest?", max_new_tokens=NEW_TOKENS
    )
    assert result.prompt_ids == inputs["input_ids"][0].tolist()
    assert result.token_ids == expected


def test_text_only_prompt_equals_transformers(case: tuple[Exported, Pipeline]) -> None:
    e, pipeline = case
    model, processor = reference(e.checkpoint)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor.tokenizer([text], return_tensors="pt")
    expected = hf_generate(model, dict(inputs))[0]
    assert pipeline.generate(None, "Hello there", max_new_tokens=NEW_TOKENS).token_ids == expected


def test_stream_yields_the_same_text(case: tuple[Exported, Pipeline]) -> None:
    _, pipeline = case
    image = make_image(41)
    pieces = list(pipeline.stream(image, "Describe the image.", max_new_tokens=12))
    assert len(pieces) > 1
    assert "".join(pieces) == pipeline.generate(image, "Describe the image.", max_new_tokens=12).text


def test_on_text_streams_the_answer_of_generate(case: tuple[Exported, Pipeline]) -> None:
    _, pipeline = case
    image, pieces = make_image(42), []
    result = pipeline.generate(image, "What is it?", max_new_tokens=12, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == result.text
    assert result.token_ids == pipeline.generate(image, "What is it?", max_new_tokens=12).token_ids
