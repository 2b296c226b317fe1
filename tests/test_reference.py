"""The PyTorch reference of the reductions (``rlens.exporter.reference``), the oracle of the ONNX graphs.

Unreduced it must equal transformers; reductions that cannot change anything (a hollow window covering
the span, PAD-FFN keeping every channel) must change nothing; and the hollow mask and the PAD-FFN
channel selection must be exactly the ones METHODS.md specifies, which is checked against hand-written
loops and literal key lists rather than against the code under test.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SPECS, make_image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rlens.exporter import reference
from rlens.exporter.reference import (
    ReducedDecoder,
    ReferenceInputs,
    pad_ffn_visual,
    prepare_inputs,
    runtime_position_ids,
    sliding_windows,
    visibility,
)
from rlens.reductions import Reductions, ffn_keep_channels, probe_indices
from rlens.tiny import TinySpec, make_tiny_llava

CASES = {
    **SPECS,  # llama (GQA), mistral (sliding window 12, GQA 4:1), qwen2 (q/k/v biases)
    "qwen2-sliding": TinySpec(backbone="qwen2", num_layers=2, num_heads=4, num_kv_heads=2, sliding_window=10),
}
QUESTION = "What is in the picture?"
TOLERANCE = 1e-5


class Case:
    """One tiny checkpoint, loaded once per module."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(directory)
        self.processor.tokenizer.padding_side = "left"
        self.visual = CASES[name].num_image_tokens

    @property
    def layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def encode(self, contents: list[list[dict]], seeds: list[int]) -> dict[str, torch.Tensor]:
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
            )
            for c in contents
        ]
        images = [make_image(s) for s in seeds]
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True)

    def batch_of_two(self) -> dict[str, torch.Tensor]:
        """Two rows of different lengths (left padding) whose images start at the same column.

        The image column is ``S - V - len(text after the image)``, so the rows share the text after the
        image and differ before it.
        """
        first = [{"type": "image"}, {"type": "text", "text": QUESTION}]
        second = [{"type": "text", "text": "Look at this one please: "}, *first]
        inputs = self.encode([first, second], [1, 2])
        assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # row 0 is padded
        return inputs

    def transformers_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        positions = runtime_position_ids(inputs["attention_mask"])  # generate's positions on real tokens
        with torch.no_grad():
            return self.model(**inputs, position_ids=positions).logits


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("reference")
    return {name: Case(name, make_tiny_llava(root / name, spec)) for name, spec in CASES.items()}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest, cases: dict[str, Case]) -> Case:
    return cases[request.param]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def reference_logits(case: Case, inputs: dict[str, torch.Tensor], reductions: Reductions) -> torch.Tensor:
    ref = prepare_inputs(case.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    return ReducedDecoder(case.model, reductions).logits(ref, all_positions=True)


# 1. Unreduced: transformers itself.


def test_unreduced_batch_of_one_equals_transformers(case: Case) -> None:
    inputs = case.encode([[{"type": "image"}, {"type": "text", "text": QUESTION}]], [3])
    expected = case.transformers_logits(inputs)
    assert relative_error(reference_logits(case, inputs, Reductions()), expected) < TOLERANCE


def test_unreduced_left_padded_batch_equals_transformers(case: Case) -> None:
    inputs = case.batch_of_two()
    real = inputs["attention_mask"].bool()
    expected = case.transformers_logits(inputs)[real]
    assert relative_error(reference_logits(case, inputs, Reductions())[real], expected) < TOLERANCE


def test_generate_equals_transformers(case: Case) -> None:
    inputs = case.encode([[{"type": "image"}, {"type": "text", "text": QUESTION}]], [11])
    with torch.no_grad():
        out = case.model.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = case.model.generation_config.eos_token_id
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    got = ReducedDecoder(case.model).generate(inputs["input_ids"], inputs["pixel_values"], 20, [eos])
    assert got == expected


def test_prepare_inputs_reads_the_visual_span(cases: dict[str, Case]) -> None:
    case = cases["llama"]
    inputs = case.batch_of_two()
    ref = prepare_inputs(case.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    columns = (inputs["input_ids"][0] == case.model.config.image_token_id).nonzero().flatten()
    assert ref.visual_start == int(columns[0])
    assert ref.visual_lengths == [case.visual, case.visual]
    text_only = prepare_inputs(case.model, inputs["input_ids"][:, :5], None)
    assert text_only.visual_lengths == [0, 0]


def test_images_at_different_columns_are_refused(cases: dict[str, Case]) -> None:
    case = cases["llama"]
    image_first = [{"type": "image"}, {"type": "text", "text": "Hi"}]
    inputs = case.encode([image_first, [{"type": "image"}, {"type": "text", "text": QUESTION}]], [1, 2])
    with pytest.raises(ValueError, match="start at different columns"):
        prepare_inputs(case.model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])


# 2. Reductions that cannot change anything.


@pytest.mark.parametrize("what", ["hollow", "ffn", "both"])
def test_reductions_that_keep_everything_equal_the_unreduced_model(case: Case, what: str) -> None:
    everything = tuple(range(case.layers))
    reductions = Reductions(
        hollow_layers=everything if what in ("hollow", "both") else (),
        hollow_window=case.visual,  # R >= V: the hollow mask is the full causal mask
        ffn_layers=everything if what in ("ffn", "both") else (),
        ffn_keep=1.0,  # every channel
        probe_every=3,
    )
    inputs = case.batch_of_two()
    real = inputs["attention_mask"].bool()
    expected = case.transformers_logits(inputs)[real]
    assert relative_error(reference_logits(case, inputs, reductions)[real], expected) < TOLERANCE


# 3. Hollow Attention.


def test_small_hollow_window_changes_the_logits(case: Case) -> None:
    inputs = case.batch_of_two()
    reduced = reference_logits(
        case, inputs, Reductions(hollow_layers=tuple(range(case.layers)), hollow_window=3)
    )
    assert relative_error(reduced[:, -1], case.transformers_logits(inputs)[:, -1]) > 1e-3


def span_case(model: Any, seed: int = 0) -> ReferenceInputs:
    """Two rows of 20 columns, visual span at column 4, lengths [9, 5]; row 1 has a left-padding column 0
    and padding columns 9..12 inside the span; text after the span, columns 13..19."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 0] = 0
    mask[1, 9:13] = 0
    d = model.config.text_config.hidden_size
    return ReferenceInputs(
        inputs_embeds=torch.randn(2, 20, d, generator=gen),
        attention_mask=mask,
        position_ids=runtime_position_ids(mask),
        visual_start=4,
        visual_lengths=[9, 5],
    )


def test_hollow_visibility_on_literal_key_lists(cases: dict[str, Case]) -> None:
    inputs = span_case(cases["llama"].model)
    visible = visibility(inputs.attention_mask, inputs.visual_mask(), None, hollow_window=3)

    def keys(row: int, query: int) -> list[int]:
        return visible[row, query].nonzero().flatten().tolist()

    assert keys(0, 12) == [0, 1, 2, 3, 10, 11, 12]  # last visual query: the prefix + a window of 3
    assert keys(0, 5) == [0, 1, 2, 3, 4, 5]  # early visual query: the window covers the span so far
    assert keys(0, 13) == list(range(14))  # a text query sees everything before it
    assert keys(1, 8) == [1, 2, 3, 6, 7, 8]  # row 1: no left-padding key, window inside 5 visual tokens
    assert keys(1, 14) == [1, 2, 3, 4, 5, 6, 7, 8, 13, 14]  # no padding keys from inside the span
    sliding = visibility(inputs.attention_mask, inputs.visual_mask(), 5, hollow_window=3)
    assert sliding[0, 12].nonzero().flatten().tolist() == [10, 11, 12]  # the window of 5 drops the prefix
    assert sliding[0, 15].nonzero().flatten().tolist() == [11, 12, 13, 14, 15]
    # the window counts real tokens: padding inside row 1's span does not push 6..8 out of it
    assert sliding[1, 14].nonzero().flatten().tolist() == [6, 7, 8, 13, 14]


def test_hollow_attention_equals_a_per_query_loop(case: Case) -> None:
    """The attention output of a hollow layer against a loop over each query's visible keys, written from
    METHODS.md alone: transformers' own rotary function, no mask tensor. A sliding window keeps a key
    when fewer than W real tokens lie in [key, query)."""
    model, window = case.model, 3
    lm = model.model.language_model
    inputs = span_case(model, seed=5)
    layer = 1 if case.layers > 1 else 0
    decoder = ReducedDecoder(model, Reductions(hollow_layers=(layer,), hollow_window=window))
    hidden = decoder.hidden_states(inputs, stop_layer=layer)  # the stream entering the hollow layer
    got = decoder.attention_output(layer, inputs, hidden)

    attn = lm.layers[layer].self_attn
    rotary = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
    sliding = sliding_windows(lm.config)[layer]
    with torch.no_grad():
        x = lm.layers[layer].input_layernorm(hidden)
        cos, sin = lm.rotary_emb(x, inputs.position_ids)
        b, s, hd = *x.shape[:2], attn.head_dim
        q = attn.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
        q, k = rotary(q, k, cos, sin)
        heads, groups = q.shape[1], q.shape[1] // k.shape[1]
        out = torch.zeros(b, s, heads, hd)
        start = inputs.visual_start
        for row in range(b):
            end = start + inputs.visual_lengths[row]
            for query in range(s):
                if not inputs.attention_mask[row, query]:
                    continue  # padding queries compute garbage nobody reads
                keys = [
                    key
                    for key in range(query + 1)
                    if inputs.attention_mask[row, key]
                    and (sliding is None or int(inputs.attention_mask[row, key:query].sum()) < sliding)
                    and not (start <= query < end and start <= key < end and key <= query - window)
                ]
                for head in range(heads):
                    weights = (k[row, head // groups, keys] @ q[row, head, query] * hd**-0.5).softmax(0)
                    out[row, query, head] = weights @ v[row, head // groups, keys]
        expected = attn.o_proj(out.reshape(b, s, -1))
    real = inputs.attention_mask.bool()
    assert relative_error(got[real], expected[real]) < TOLERANCE


# 4. PAD-FFN.


def test_computing_k_channels_equals_zeroing_the_others(cases: dict[str, Case]) -> None:
    mlp = cases["llama"].model.model.language_model.layers[0].mlp
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, mlp.gate_proj.in_features, generator=gen)
    channels = torch.randperm(mlp.gate_proj.out_features, generator=gen)[:25]
    with torch.no_grad():
        full = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # [V, d_ff]
        zeroed = torch.zeros_like(full)
        zeroed[:, channels] = full[:, channels]
        assert relative_error(pad_ffn_visual(mlp, x, channels), mlp.down_proj(zeroed)) < TOLERANCE


def test_keep_zero_leaves_visual_tokens_the_residual_only(cases: dict[str, Case]) -> None:
    model = cases["qwen2"].model
    inputs = span_case(model)
    visual = inputs.visual_mask()
    decoder = ReducedDecoder(model, Reductions(ffn_layers=(0,), ffn_keep=0.0))
    x = inputs.inputs_embeds
    with torch.no_grad():
        out = decoder.ffn(0, x, inputs, visual)
        assert torch.equal(out[visual], torch.zeros_like(out[visual]))
        assert torch.allclose(out[~visual], model.model.language_model.layers[0].mlp(x[~visual]))


def test_probes_and_channels_are_the_specified_ones(
    cases: dict[str, Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = cases["llama"].model
    mlp = model.model.language_model.layers[1].mlp
    inputs = span_case(model, seed=2)
    visual, x, keep, every = inputs.visual_mask(), inputs.inputs_embeds, 0.3, 3
    seen = []
    original = reference.pad_ffn_channels
    monkeypatch.setattr(reference, "pad_ffn_channels", lambda m, p, k: seen.append(p) or original(m, p, k))
    decoder = ReducedDecoder(model, Reductions(ffn_layers=(1,), ffn_keep=keep, probe_every=every))
    with torch.no_grad():
        out = decoder.ffn(1, x, inputs, visual)
        assert [len(p) for p in seen] == [3, 1]  # P = max(1, V // 3) for V = 9 and 5
        assert probe_indices(9, every) == [0, 4, 8] and probe_indices(5, every) == [0]
        k = ffn_keep_channels(keep, mlp.gate_proj.out_features)
        for row, length in enumerate(inputs.visual_lengths):
            tokens = x[row, 4 : 4 + length]
            probes = tokens[probe_indices(length, every)]
            assert torch.equal(seen[row], probes)
            scores = (mlp.act_fn(mlp.gate_proj(probes)) * mlp.up_proj(probes)).abs().mean(0)
            channels = scores.argsort(descending=True)[:k]
            full = mlp.act_fn(mlp.gate_proj(tokens)) * mlp.up_proj(tokens)
            zeroed = torch.zeros_like(full)
            zeroed[:, channels] = full[:, channels]
            assert relative_error(out[row, 4 : 4 + length], mlp.down_proj(zeroed)) < TOLERANCE
        assert torch.allclose(out[~visual], mlp(x[~visual]))


def test_real_tokens_inside_the_span_are_refused(cases: dict[str, Case]) -> None:
    inputs = span_case(cases["llama"].model)
    inputs.attention_mask[1, 10] = 1  # a real token after row 1's 5 visual tokens, inside the span
    with pytest.raises(ValueError, match="must be padding"):
        ReferenceInputs(**vars(inputs))


# 5. Padding inside the visual span.


def test_padding_inside_the_span_equals_the_row_alone(case: Case) -> None:
    """Rows of 16 and 10 visual tokens; the shorter is padded inside the span. On the sliding-window
    backbones this holds because the window counts real tokens, not columns."""
    model = case.model
    inputs = case.encode([[{"type": "image"}, {"type": "text", "text": QUESTION}]] * 2, [4, 5])
    full = prepare_inputs(model, inputs["input_ids"], inputs["pixel_values"])
    start, length, short = full.visual_start, case.visual, 10
    embeds = full.inputs_embeds.clone()
    embeds[1, start + short : start + length] = torch.randn(length - short, embeds.shape[-1])  # ignored
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, start + short : start + length] = 0
    batch = ReferenceInputs(embeds, mask, runtime_position_ids(mask), start, [length, short])
    alone_embeds = torch.cat([embeds[1:, : start + short], embeds[1:, start + length :]], dim=1)
    alone_mask = torch.ones(alone_embeds.shape[:2], dtype=torch.long)
    alone = ReferenceInputs(alone_embeds, alone_mask, runtime_position_ids(alone_mask), start, [short])
    first = ReferenceInputs(embeds[:1], mask[:1], runtime_position_ids(mask[:1]), start, [length])
    reductions = Reductions(
        hollow_layers=(0, 1), hollow_window=4, ffn_layers=(0, 1), ffn_keep=0.3, probe_every=3
    )
    decoder = ReducedDecoder(model, reductions)
    got = decoder.logits(batch)
    assert relative_error(got[1], decoder.logits(alone)[0]) < TOLERANCE
    assert relative_error(got[0], decoder.logits(first)[0]) < TOLERANCE
    unreduced = ReducedDecoder(model).logits(alone)[0]
    assert relative_error(got[1], unreduced) > 1e-3  # the reductions did act on the padded row
