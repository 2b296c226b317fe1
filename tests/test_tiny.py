"""Tests for rlens.tiny: the tiny offline LLaVA checkpoints every other test builds on.

If these checkpoints were wrong in a quiet way (a zero bias, a processor that expands <image> to the
wrong count, a tokenizer without <s>), exporter tests comparing against them would pass for the
wrong reason, so this checks the checkpoint as a user of transformers would see it after reloading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rlens.errors import RlensError
from rlens.tiny import BACKBONES, TinySpec, make_tiny_llava

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One default checkpoint per backbone, shared by the tests of this module (building is the slow part)."""
    root = tmp_path_factory.mktemp("tiny")
    return {b: make_tiny_llava(root / b, TinySpec(backbone=b)) for b in BACKBONES}


def _load(path: Path) -> tuple[LlavaForConditionalGeneration, object]:
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return model, AutoProcessor.from_pretrained(path)


def _image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _inputs(processor: object, messages: list[dict] = MESSAGES) -> dict[str, torch.Tensor]:
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=_image(), text=prompt, return_tensors="pt")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_reload_process_generate(checkpoints: dict[str, Path], backbone: str) -> None:
    spec = TinySpec(backbone=backbone)
    model, processor = _load(checkpoints[backbone])
    tok = processor.tokenizer
    cfg = model.config

    assert type(cfg.text_config).__name__.lower().startswith(backbone)
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert cfg.tie_word_embeddings is False and cfg.text_config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.image_seq_length == spec.num_image_tokens == 16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    inputs = _inputs(processor)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and ids[0, 0] == tok.bos_token_id
    assert int((ids == cfg.image_token_id).sum()) == spec.num_image_tokens
    assert tuple(inputs["pixel_values"].shape) == (1, 3, spec.image_size, spec.image_size)

    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    n = ids.shape[1]
    assert out.shape[0] == 1 and n < out.shape[1] <= n + 5
    assert torch.equal(out[:, :n], ids)
    if out.shape[1] < n + 5:  # stopped early: only at eos
        assert out[0, -1] == tok.eos_token_id
    again = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)


def test_attention_biases(checkpoints: dict[str, Path]) -> None:
    """Qwen2's q/k/v biases survive the reload non-zero; llama and mistral have none."""
    for backbone in BACKBONES:
        model = LlavaForConditionalGeneration.from_pretrained(checkpoints[backbone])
        attn = model.model.language_model.layers[0].self_attn
        if backbone == "qwen2":
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                assert proj.bias is not None and proj.bias.abs().min() > 0
            assert attn.o_proj.bias is None
        else:
            assert attn.q_proj.bias is None and attn.o_proj.bias is None


def test_weights_not_trivial(checkpoints: dict[str, Path]) -> None:
    """Norm weights are not all ones and biases not all zeros anywhere, text or vision."""
    weights = load_file(checkpoints["llama"] / "model.safetensors")
    norms = [k for k in weights if "norm" in k and k.endswith(".weight")]
    biases = [k for k in weights if k.endswith(".bias")]
    assert norms and biases
    for key in norms:
        assert not torch.all(weights[key] == 1), key
    for key in biases:
        assert weights[key].abs().max() > 0, key
    # transformers 5 saves llava in the original hub layout ("language_model.model.embed_tokens..."),
    # not its in-memory one ("model.language_model.embed_tokens..."), so match on the suffix only.
    (embed,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    assert 0.05 < float(weights[embed].std()) < 0.2


def test_greedy_not_degenerate(checkpoints: dict[str, Path]) -> None:
    """Over 20 greedy tokens at least one backbone emits more than one distinct token."""
    distinct = {}
    for backbone in BACKBONES:
        model, processor = _load(checkpoints[backbone])
        inputs = _inputs(processor)
        out = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        assert new.numel() == 20
        distinct[backbone] = len(set(new.tolist()))
    assert max(distinct.values()) > 1, distinct


def test_same_seed_same_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    again = make_tiny_llava(tmp_path / "a", TinySpec(backbone="llama"))
    other = make_tiny_llava(tmp_path / "b", TinySpec(backbone="llama", seed=1))
    ref = load_file(checkpoints["llama"] / "model.safetensors")
    same = load_file(again / "model.safetensors")
    diff = load_file(other / "model.safetensors")
    assert ref.keys() == same.keys() == diff.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    # every tensor is random (norm weights and biases included), so every one must change
    assert not any(torch.equal(ref[k], diff[k]) for k in ref)
    # the tokenizer is trained, so it must be reproducible too
    assert (again / "tokenizer.json").read_text() == (checkpoints["llama"] / "tokenizer.json").read_text()


def test_chat_template(checkpoints: dict[str, Path]) -> None:
    processor = AutoProcessor.from_pretrained(checkpoints["llama"])
    tok = processor.tokenizer

    def render(messages: list[dict], gen: bool = True) -> str:
        return processor.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)

    assert render(MESSAGES) == "USER: <image>\nWhat color is the circle? ASSISTANT:"
    text_first = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}]
    assert render(text_first) == "USER: Look:<image>\n ASSISTANT:"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": "Color?"},
    ]
    expected = "Be brief. USER: <image>\nShape? ASSISTANT: A circle.</s>USER: Color? ASSISTANT:"
    assert render(conversation) == expected
    assert render(conversation[:3], gen=False) == "Be brief. USER: <image>\nShape? ASSISTANT: A circle.</s>"
    # The tokenizer carries the same template, and adds <s> itself: the template must not.
    assert tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == expected
    assert "<s>" not in expected
    ids = tok("hi")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # Tokenizing through the processor gives one <s> and the expanded image (the tokenizer's own
    # apply_chat_template(tokenize=True) never adds special tokens, so it would have no <s>).
    content = [{"type": "image", "image": _image()}, {"type": "text", "text": "Hi"}]
    with_image = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        with_image, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 16
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)


@pytest.mark.parametrize("backbone", ["mistral", "qwen2"])
def test_sliding_window(tmp_path: Path, backbone: str) -> None:
    path = make_tiny_llava(tmp_path / "nested" / "dir", TinySpec(backbone=backbone, sliding_window=8))
    assert path == tmp_path / "nested" / "dir"
    model, processor = _load(path)
    text = model.config.text_config
    assert text.sliding_window == 8
    if backbone == "qwen2":
        assert text.use_sliding_window is True
        assert set(text.layer_types) == {"sliding_attention"}
    out = model.generate(**_inputs(processor), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1


def test_no_sliding_window_by_default(checkpoints: dict[str, Path]) -> None:
    for backbone in ("mistral", "qwen2"):
        text = LlavaForConditionalGeneration.from_pretrained(checkpoints[backbone]).config.text_config
        assert text.sliding_window is None


@pytest.mark.parametrize(
    "spec",
    [
        TinySpec(backbone="gpt2"),
        TinySpec(image_size=30),
        TinySpec(num_kv_heads=3),
        TinySpec(backbone="llama", sliding_window=8),
    ],
)
def test_bad_spec(tmp_path: Path, spec: TinySpec) -> None:
    with pytest.raises(RlensError):
        make_tiny_llava(tmp_path, spec)
