"""TRIM: the selection graph, run in ONNX Runtime, against the PyTorch reference and numpy's percentile.

One tiny LLaVA (36 visual tokens) and the tiny CLIP built on its vision tower, made once per module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from rlens.errors import RlensError
from rlens.exporter.checkpoint import load_model, vision_spec, vision_weights
from rlens.exporter.clip import check_same_vision_tower, clip_text_spec, clip_weights, load_clip
from rlens.exporter.trim_reference import trim_reference
from rlens.graphs.builder import BOOL, FLOAT, INT64, GraphBuilder
from rlens.graphs.trim import (
    build_trim,
    clip_text_encoder,
    gather_selected,
    iqr_select,
    quartiles,
    ratio_select,
)
from rlens.tiny import TinySpec, make_tiny_clip, make_tiny_llava

torch.set_num_threads(1)

INSTRUCTIONS = [
    "What color is the circle?",
    "How many yellow stars are above the triangle in the picture?",
    "Describe the image.",
    "Is the square bigger than the circle? Answer with a single word.",
    "Where is the cat?",
    "dog",
]
COMBOS = [("high", "iqr", None), ("low", "iqr", None), ("high", "ratio", 0.25), ("low", "ratio", 0.25)]


def session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_block(
    build: Callable[[GraphBuilder, list[ir.Value]], ir.Value | tuple[ir.Value, ...]],
    feeds: dict[str, np.ndarray],
    out_dtypes: tuple[ir.DataType, ...] = (FLOAT,),
) -> list[np.ndarray]:
    """Build a graph over ``feeds`` (inputs with static shapes) and run it in ONNX Runtime."""
    b = GraphBuilder("test")
    types = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64, np.dtype(bool): BOOL}
    inputs = [b.input(name, types[a.dtype], list(a.shape)) for name, a in feeds.items()]
    outs = build(b, inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for i, (value, dtype) in enumerate(zip(outs, out_dtypes, strict=True)):
        b.output(value, f"y{i}", dtype, [])
    return session(b.build()).run(None, feeds)


@dataclass
class Tiny:
    llava: Any
    clip: Any
    tokenizer: Any
    sessions: dict[tuple, ort.InferenceSession] = field(default_factory=dict)

    def graph(self, select: str, mode: str, ratio: float | None) -> ort.InferenceSession:
        key = (select, mode, ratio)
        if key not in self.sessions:
            self.sessions[key] = session(self.build(select, mode, ratio))
        return self.sessions[key]

    def build(self, select: str, mode: str, ratio: float | None) -> ir.Model:
        tower, proj = vision_weights(self.llava)
        return build_trim(
            vision_spec(self.llava),
            tower,
            proj,
            clip_text_spec(self.clip),
            clip_weights(self.clip),
            select=select,
            mode=mode,
            ratio=ratio,
        )

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def compare(
        self, pixels: np.ndarray, texts: list[str], select: str, mode: str, ratio: float | None
    ) -> list[int]:
        """Run the graph and the reference; assert same tokens, features within 1e-5; return the counts."""
        ids, mask = self.tokenize(texts)
        features, counts = self.graph(select, mode, ratio).run(
            None, {"pixel_values": pixels, "clip_input_ids": ids, "clip_attention_mask": mask}
        )
        expected = trim_reference(
            self.llava,
            self.clip,
            torch.from_numpy(pixels),
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            select=select,
            mode=mode,
            ratio=ratio,
        )
        V = features.shape[1] - 1
        for row, (keep, ref) in enumerate(expected):
            n = len(keep) + (1 if len(keep) < V else 0)
            assert counts[row] == n, (row, counts, keep)
            np.testing.assert_allclose(features[row, :n], ref.numpy(), rtol=1e-5, atol=1e-5)
            assert np.all(features[row, n:] == 0), "rows past the count must be zeros"
        return [int(c) for c in counts]


def make_tiny(root: Path, spec: TinySpec) -> Tiny:
    llava_dir = make_tiny_llava(root / "llava", spec)
    clip_dir = make_tiny_clip(root / "clip", llava_dir, seed=spec.seed)
    from transformers import AutoTokenizer

    return Tiny(load_model(llava_dir), load_clip(clip_dir), AutoTokenizer.from_pretrained(clip_dir))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("trim"), TinySpec(image_size=48, patch_size=8, seed=7))


def pixels(seed: int, batch: int = 2, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


# -- 1. the graph against the reference -----------------------------------------------------------
@pytest.mark.parametrize(("select", "mode", "ratio"), COMBOS)
def test_graph_matches_reference(tiny: Tiny, select: str, mode: str, ratio: float | None) -> None:
    counts = []
    for case in (0, 1, 4):  # images and instruction pairs that give rows of different counts
        texts = [INSTRUCTIONS[case % 6], INSTRUCTIONS[(case + 3) % 6]]
        counts.append(tiny.compare(pixels(case), texts, select, mode, ratio))
    if mode == "ratio":
        assert all(c == [9 + 1, 9 + 1] for c in counts), counts  # round(0.25 * 36) = 9 kept + 1 merged
    else:
        assert any(a != b for a, b in counts), f"want rows with different counts: {counts}"


# -- 2. quartiles as numpy's percentile -----------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 577])
def test_quartiles_equal_numpy_percentile(n: int) -> None:
    p = np.random.default_rng(n).random((4, n)).astype(np.float32)
    p[3] = np.round(p[3] * 4) / 4  # ties
    q1, q3 = run_block(lambda b, i: quartiles(b, i[0], n), {"p": p}, (FLOAT, FLOAT))
    expected = np.percentile(p, [25, 75], axis=1)  # float64, from float32 order statistics
    np.testing.assert_array_equal(q1[:, 0], expected[0].astype(np.float32))
    np.testing.assert_array_equal(q3[:, 0], expected[1].astype(np.float32))


def test_iqr_select_keeps_the_upper_outliers() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((3, 50)).astype(np.float32)
    p[0, [3, 17]] = 5.0  # two outliers
    p[1, 40] = 3.0
    (keep,) = run_block(lambda b, i: iqr_select(b, i[0], 50), {"p": p}, (BOOL,))
    for row in range(3):
        q1, q3 = np.percentile(p[row], [25, 75])
        expected = p[row] > q3 + 1.5 * (q3 - q1)
        if not expected.any():
            expected[np.argmax(p[row])] = True
        np.testing.assert_array_equal(keep[row], expected)
    assert np.flatnonzero(keep[0]).tolist() == [3, 17]
    assert np.flatnonzero(keep[1]).tolist() == [40]


def test_gather_selected_orders_kept_rows_then_the_mean() -> None:
    n, C = 6, 3
    H = np.random.default_rng(1).normal(size=(4, n, C)).astype(np.float32)
    keep = np.array(
        [[0, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=bool
    )
    rows, count = run_block(
        lambda b, i: gather_selected(b, i[0], i[1], n), {"H": H, "keep": keep}, (FLOAT, INT64)
    )
    assert rows.shape == (4, n + 1, C)
    for r in range(4):
        expected = H[r][keep[r]]
        if not keep[r].all():
            expected = np.concatenate([expected, H[r][~keep[r]].mean(axis=0, keepdims=True)])
        assert count[r] == len(expected)
        np.testing.assert_allclose(rows[r, : len(expected)], expected, rtol=1e-6, atol=1e-6)


# -- 3. edge cases --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 36])
def test_iqr_select_on_equal_scores_keeps_exactly_the_first(n: int) -> None:
    p = np.full((2, n), 1.0 / n, dtype=np.float32)
    (keep,) = run_block(lambda b, i: iqr_select(b, i[0], n), {"p": p}, (BOOL,))
    assert keep.sum(axis=1).tolist() == [1, 1]
    assert keep[:, 0].all()


def test_ratio_select_breaks_ties_by_index() -> None:
    p = np.array([[0.1, 0.3, 0.3, 0.2, 0.3, 0.1, 0.0, 0.3]], dtype=np.float32)
    (keep,) = run_block(lambda b, i: ratio_select(b, i[0], 8, 0.3), {"p": p}, (BOOL,))  # round(2.4) = 2
    assert np.flatnonzero(keep[0]).tolist() == [1, 2]
    (keep,) = run_block(lambda b, i: ratio_select(b, i[0], 8, 1 / 16), {"p": p}, (BOOL,))  # at least 1
    assert np.flatnonzero(keep[0]).tolist() == [1]


def test_empty_and_long_instructions(tiny: Tiny) -> None:
    ids, _ = tiny.tokenize([""])
    assert ids[0].tolist() == [tiny.tokenizer.bos_token_id, tiny.tokenizer.eos_token_id]
    long = " ".join(INSTRUCTIONS * 10)
    ids, _ = tiny.tokenize([long, ""])
    assert ids.shape == (2, 77) and ids[0, -1] == tiny.tokenizer.eos_token_id
    for select, mode, ratio in COMBOS[:2]:
        tiny.compare(pixels(5), ["", ""], select, mode, ratio)
        tiny.compare(pixels(6), [long, ""], select, mode, ratio)


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_clip_text_encoder_equals_transformers(tiny: Tiny, legacy_eos: bool) -> None:
    """Pooled output at L = 77, padded rows and the empty instruction; legacy configs pool at argmax(ids)."""
    ids, mask = tiny.tokenize([" ".join(INSTRUCTIONS * 10), "", INSTRUCTIONS[1]])
    spec = clip_text_spec(tiny.clip)
    text_model = tiny.clip.text_model
    if legacy_eos:
        text_model = copy.copy(text_model)  # a shallow copy: only the pooling rule changes
        text_model.eos_token_id = 2
        spec = replace(spec, eos_token_id=2)
    weights = clip_weights(tiny.clip)
    (got,) = run_block(
        lambda b, i: clip_text_encoder(b, i[0], i[1], weights, spec), {"ids": ids, "mask": mask}
    )
    with torch.no_grad():
        expected = text_model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).pooler_output
    assert ids.shape[1] == 77
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_one_visual_token(tmp_path: Path) -> None:
    """image_size == patch_size: V = 1, always kept, nothing to merge."""
    small = make_tiny(tmp_path, TinySpec(image_size=8, patch_size=8, seed=3))
    for select, mode, ratio in COMBOS:
        counts = small.compare(pixels(1, size=8), INSTRUCTIONS[:2], select, mode, ratio)
        assert counts == [1, 1]


# -- 4. the tower check ---------------------------------------------------------------------------
def test_check_same_vision_tower(tiny: Tiny, tmp_path: Path) -> None:
    check_same_vision_tower(tiny.llava, tiny.clip)
    other = copy.deepcopy(tiny.clip)
    with torch.no_grad():  # the last layer is not used by LLaVA's features (feature layer -2)
        other.vision_model.encoder.layers[2].mlp.fc1.weight.add_(1.0)
    check_same_vision_tower(tiny.llava, other)
    with torch.no_grad():
        other.vision_model.encoder.layers[0].mlp.fc1.weight[0, 0] += 0.5
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(RlensError, match=r"\(encoder\.layers\.0\.mlp\.fc1\.weight\)") as err:
        check_same_vision_tower(tiny.llava, load_clip(tmp_path / "other"))
    assert "\n" not in str(err.value)
    with pytest.raises(RlensError, match="not a CLIP checkpoint"):
        load_clip(tmp_path / "missing")
