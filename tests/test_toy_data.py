"""The toy data generator: deterministic, balanced, and every answer right for the scene it was drawn from."""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlens.toy.data import (
    COLOURS,
    KINDS,
    PLURALS,
    POSITION_MARGIN,
    POSITIONS,
    SHAPES,
    Obj,
    Sample,
    is_correct,
    make_scene,
    normalize_answer,
    patch_labels,
    questions_for,
    toy_set,
    write_jsonl,
)

N = 60


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return toy_set(N, seed=3)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_samples_different_seed_different(samples: list[Sample]) -> None:
    again = toy_set(N, seed=3)
    assert [(s.question, s.answer, s.kind) for s in again] == [
        (s.question, s.answer, s.kind) for s in samples
    ]
    assert [png(s.image) for s in again[:12]] == [png(s.image) for s in samples[:12]]
    other = toy_set(12, seed=4)
    assert [png(s.image) for s in other] != [png(s.image) for s in samples[:12]]
    assert [s.question for s in other] != [s.question for s in samples[:12]]
    # a prefix of a set is not the same as a smaller set's (one rng stream), but it is deterministic
    assert [s.question for s in toy_set(6, seed=3)] == [s.question for s in samples[:6]]


def test_exactly_n_balanced_kinds(samples: list[Sample]) -> None:
    assert len(samples) == N
    assert [s.kind for s in samples] == [KINDS[i % len(KINDS)] for i in range(N)]
    answers = collections.Counter((s.kind, s.answer) for s in samples if s.kind in ("exists", "relative"))
    per_kind = N // len(KINDS)
    assert answers[("exists", "yes")] == answers[("exists", "no")] == per_kind // 2
    before = answers[("relative", "left")] + answers[("relative", "above")]
    after = answers[("relative", "right")] + answers[("relative", "below")]
    assert before == after == per_kind // 2
    assert min(answers[("relative", side)] for side in ("left", "right", "above", "below")) > 0
    assert len(toy_set(7, seed=0)) == 7
    assert toy_set(0, seed=0) == []


def test_images_and_objects(samples: list[Sample]) -> None:
    for sample in samples:
        scene = sample.scene
        assert scene is not None and scene.image is sample.image
        assert sample.image.size == (224, 224) and sample.image.mode == "RGB"
        assert 1 <= len(scene.objects) <= 6
        for i, obj in enumerate(scene.objects):
            assert obj.colour in COLOURS and obj.shape in SHAPES
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
            ys, xs = np.nonzero(obj.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.bbox
            for other in scene.objects[i + 1 :]:  # boxes never overlap
                a, b = obj.bbox, other.bbox
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    small = make_scene(np.random.default_rng(0), size=96)
    assert small.image.size == (96, 96)
    sizes = [o.bbox[2] - o.bbox[0] for s in samples for o in s.scene.objects]
    assert max(sizes) > 2 * min(sizes)  # varied sizes


def expected_answer(question: str, objects: list[Obj], size: int) -> str | None:
    """The answer recomputed from the objects alone, or None when the question is ambiguous."""
    q = question.rstrip("?")
    names = [o.name for o in objects]

    def the(name: str) -> Obj | None:
        matches = [o for o in objects if o.name == name]
        return matches[0] if len(matches) == 1 else None

    for shape in SHAPES:
        if q in (f"What colour is the {shape}", f"What is the colour of the {shape}"):
            matches = [o for o in objects if o.shape == shape]
            return matches[0].colour if len(matches) == 1 else None
    for colour in COLOURS:
        if q in (f"What shape is the {colour} object", f"Which shape is {colour}"):
            matches = [o for o in objects if o.colour == colour]
            return matches[0].shape if len(matches) == 1 else None
        if q == f"How many {colour} objects are there":
            return str(sum(o.colour == colour for o in objects))
    if q in ("How many objects are there", "How many shapes are there"):
        return str(len(objects))
    for shape, plural in PLURALS.items():
        if q == f"How many {plural} are there":
            return str(sum(o.shape == shape for o in objects))
    if q.startswith("Is there a"):
        return "yes" if q.split(" ", 3)[3] in names else "no"
    for prefix in ("Where is the ", "In which part of the image is the "):
        if q.startswith(prefix):
            obj = the(q[len(prefix) :])
            if obj is None:
                return None
            cx, cy = (obj.bbox[0] + obj.bbox[2]) / 2, (obj.bbox[1] + obj.bbox[3]) / 2
            if min(abs(cx - size / 2), abs(cy - size / 2)) < POSITION_MARGIN * size:
                return None
            return ("top" if cy < size / 2 else "bottom") + (" left" if cx < size / 2 else " right")
    if q.startswith("Is the "):
        for choice, sides in (
            ("left or right of", ("left", "right")),
            ("above or below", ("above", "below")),
        ):
            head, sep, tail = q[len("Is the ") :].partition(f" {choice} the ")
            if sep:
                a, b = the(head), the(tail)
                if a is None or b is None:
                    return None
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
                first, second = (ax1 <= bx0, bx1 <= ax0) if sides[0] == "left" else (ay1 <= by0, by1 <= ay0)
                if first == second:  # overlapping along that axis: not asked
                    return None
                return sides[0] if first else sides[1]
    raise AssertionError(f"unknown question {question!r}")


def test_every_answer_follows_from_the_objects(samples: list[Sample]) -> None:
    checked = collections.Counter()
    rng = np.random.default_rng(11)
    all_questions = [q for s in samples[:20] for q in questions_for(s.scene, rng)]
    for sample in [*samples, *all_questions]:
        assert sample.kind in KINDS
        assert normalize_answer(sample.answer) == sample.answer  # canonical
        assert expected_answer(sample.question, sample.scene.objects, sample.scene.size) == sample.answer, (
            sample.question,
            sample.scene.objects,
        )
        checked[sample.kind] += 1
        if sample.kind == "position":
            assert sample.answer in POSITIONS
        if sample.kind == "exists":
            assert sample.answer in ("yes", "no")
        if sample.kind == "relative":
            assert sample.answer in ("left", "right", "above", "below")
        if sample.kind == "count":
            assert sample.answer.isdigit() and 0 <= int(sample.answer) <= 6
    assert set(checked) == set(KINDS)


def test_questions_for_covers_kinds() -> None:
    rng = np.random.default_rng(5)
    kinds = collections.Counter(q.kind for _ in range(20) for q in questions_for(make_scene(rng), rng))
    assert set(kinds) == set(KINDS)
    exists = [q for q in questions_for(make_scene(rng), rng) if q.kind == "exists"]
    assert sum(q.answer == "yes" for q in exists) == sum(q.answer == "no" for q in exists)


def test_patch_labels(samples: list[Sample]) -> None:
    scene = samples[0].scene
    labels = patch_labels(scene, 16)
    assert labels.shape == (16, 16)
    assert set(np.unique(labels)) <= {-1, *range(len(scene.objects))}
    for index, obj in enumerate(scene.objects):  # a labelled patch lies on its object's box
        rows, cols = np.nonzero(labels == index)
        assert np.all(cols * 14 < obj.bbox[2]) and np.all((cols + 1) * 14 > obj.bbox[0])
        assert np.all(rows * 14 < obj.bbox[3]) and np.all((rows + 1) * 14 > obj.bbox[1])


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("Red.", "red"),
        ("  The   RED circle!  ", "red circle"),
        ("Three", "3"),
        ("an orange", "orange"),
        ("Top-left", "top left"),
        ("Color", "colour"),
        ("yes, it is.", "yes it is"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "answer", "correct"),
    [
        ("red", "red", True),
        ("Red.", "red", True),
        ("red circle", "red", True),
        ("reddish", "red", False),
        ("blue", "red", False),
        ("three", "3", True),
        ("3 circles", "3", True),
        ("12", "1", False),
        ("Yes, it is.", "yes", True),
        ("no", "yes", False),
        ("top-left", "top left", True),
        ("top", "top left", False),
        ("the bottom right corner", "bottom right", True),
        ("", "red", False),
        ("it is red", "red", False),
    ],
)
def test_is_correct(prediction: str, answer: str, correct: bool) -> None:
    assert is_correct(prediction, answer) is correct


def test_write_jsonl_round_trip(samples: list[Sample], tmp_path: Path) -> None:
    path = write_jsonl(samples[:7], tmp_path / "set" / "data.jsonl")
    assert path == tmp_path / "set" / "data.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 7
    for i, (line, sample) in enumerate(zip(lines, samples[:7], strict=True)):
        assert line["image"] == f"images/{i:06d}.png"
        assert (line["prompt"], line["answer"], line["kind"]) == (sample.question, sample.answer, sample.kind)
        assert line["objects"] == [o.to_json() for o in sample.scene.objects]
        with Image.open(path.parent / line["image"]) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(sample.image))
