"""The Layer Ranking Algorithm: greedy forward selection over a tiny 4-layer model, resumable on disk.

Three calibration samples (noise images, short prompts, one without an answer so the model's own
greedy answer is used). The ranking is checked against scores recomputed directly, the cached
activations against a forward from the embeddings, and an interrupted run against an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_image
from PIL import Image

from rlens.errors import RlensError
from rlens.exporter import layer_ranking
from rlens.exporter.layer_ranking import (
    KINDS,
    LayerScorer,
    Ranking,
    load_scorer,
    plot_ranking,
    rank_layers,
    read_calibration,
    read_ranking,
)
from rlens.tiny import TinySpec, make_tiny_llava

LAYERS = 4
PARAMS = {"hollow_window": 4, "ffn_keep": 0.25, "probe_every": 4}
SAMPLES = [
    {"image": "red.png", "prompt": "What color is the circle?", "answer": "The circle is red."},
    {"image": "shapes.png", "prompt": "Describe the image."},  # no answer: the model's own
    {"image": "ABSOLUTE", "prompt": "How many squares?", "answer": "Four."},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model dir, calibration file); images next to the file, one named by an absolute path."""
    root = tmp_path_factory.mktemp("ranking")
    model = make_tiny_llava(root / "model", TinySpec(num_layers=LAYERS, seed=5))
    calib_dir = root / "calib"
    calib_dir.mkdir()
    lines = []
    for seed, sample in enumerate(SAMPLES):
        name = "square.png" if sample["image"] == "ABSOLUTE" else sample["image"]
        make_image(seed, (32, 40)).save(calib_dir / name)
        image = str(calib_dir / name) if sample["image"] == "ABSOLUTE" else name
        lines.append(json.dumps({**sample, "image": image}))
    calib = calib_dir / "calib.jsonl"
    calib.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is allowed
    return model, calib


@pytest.fixture(scope="module")
def ranked(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Ranking, Path]:
    model, calib = setup
    output = tmp_path_factory.mktemp("ranked") / "ranking.json"
    return rank_layers(model, calib, output, progress=False, **PARAMS), output


@pytest.fixture(scope="module")
def scorer(setup: tuple[Path, Path]) -> LayerScorer:
    model, calib = setup
    return load_scorer(model, calib, **PARAMS)


def test_lists_are_permutations_with_a_score_per_step(ranked: tuple[Ranking, Path]) -> None:
    ranking, output = ranked
    assert ranking.complete
    for kind in KINDS:
        assert sorted(ranking.order(kind)) == list(range(LAYERS))
        assert len(ranking.scores(kind)) == LAYERS
        assert ranking.scores(kind)[-1] > 0  # every layer reduced changes the answers
    data = json.loads(output.read_text())
    assert data["complete"] is True and data["num_layers"] == LAYERS and data["parameters"] == PARAMS
    assert read_ranking(output) == ranking


def test_each_step_picks_the_lowest_score(ranked: tuple[Ranking, Path], scorer: LayerScorer) -> None:
    ranking, _ = ranked
    for kind in KINDS:
        singles = [scorer.score(kind, [layer]) for layer in range(LAYERS)]
        best = min(range(LAYERS), key=lambda layer: (singles[layer], layer))
        assert ranking.order(kind)[0] == best
        assert ranking.scores(kind)[0] == pytest.approx(singles[best], abs=1e-12)
        first_two = ranking.order(kind)[:2]
        assert ranking.scores(kind)[1] == pytest.approx(scorer.score(kind, first_two), abs=1e-12)


def test_last_layer_reduced_alone_changes_no_answer(scorer: LayerScorer) -> None:
    """Only visual tokens change in a reduced layer, and nothing reads them after the last layer."""
    for kind in KINDS:
        assert scorer.score(kind, [LAYERS - 1]) == 0.0
        assert scorer.score(kind, [0]) > 0.0


def test_cached_activations_equal_a_forward_from_scratch(scorer: LayerScorer) -> None:
    for kind in KINDS:
        for layers in ([1, 3], [2], [1, 2]):
            cached = scorer.score(kind, layers)
            scratch = scorer.score(kind, layers, reuse_activations=False)
            assert abs(cached - scratch) < 1e-6, (kind, layers, cached, scratch)


def test_answer_positions_are_the_answer_tokens(setup: tuple[Path, Path], scorer: LayerScorer) -> None:
    """Teacher forcing on " The circle is red.</s>": the last prompt column, every answer column but the
    last."""
    from transformers import AutoTokenizer

    first, unanswered, _ = scorer.samples
    answer = AutoTokenizer.from_pretrained(setup[0])(" The circle is red.</s>", add_special_tokens=False)
    count = len(answer["input_ids"])
    seq = first.inputs.inputs_embeds.shape[1]  # prompt + answer without its last token
    assert first.positions.tolist() == list(range(seq - count, seq))
    assert first.log_p.shape[0] == count
    assert 1 <= len(unanswered.positions) <= layer_ranking.SELF_ANSWER_TOKENS


def test_interrupted_ranking_resumes_to_the_same_file(
    setup: tuple[Path, Path], ranked: tuple[Ranking, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, calib = setup
    output = tmp_path / "ranking.json"
    evaluations = []
    score = LayerScorer.score
    monkeypatch.setattr(
        LayerScorer, "score", lambda self, *a, **k: evaluations.append(a) or score(self, *a, **k)
    )
    write = layer_ranking._write_ranking

    def write_then_stop(path: Path, ranking: Ranking) -> None:
        write(path, ranking)
        if len(ranking.hollow_order) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(layer_ranking, "_write_ranking", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        rank_layers(model, calib, output, progress=False, **PARAMS)
    assert len(evaluations) == 4 + 3 + 2
    partial = json.loads(output.read_text())
    assert len(partial["hollow"]["order"]) == 3 and partial["ffn"]["order"] == [] and not partial["complete"]
    with pytest.raises(RlensError, match=r"unfinished ranking \(3/4 hollow and 0/4 FFN"):
        read_ranking(output)

    monkeypatch.setattr(layer_ranking, "_write_ranking", write)
    evaluations.clear()
    rank_layers(model, calib, output, progress=False, **PARAMS)
    assert len(evaluations) == LAYERS * (LAYERS + 1) - 9  # only the steps not on disk yet
    assert output.read_text() == ranked[1].read_text()


def test_a_complete_file_is_returned_without_loading_the_model(
    setup: tuple[Path, Path], ranked: tuple[Ranking, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, calib = setup
    output = tmp_path / "ranking.json"
    shutil.copy(ranked[1], output)

    def no_model(*_: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("rlens.exporter.checkpoint.load_model", no_model)
    assert rank_layers(model, calib, output, progress=False, **PARAMS) == ranked[0]


def test_a_ranking_of_other_inputs_is_refused(
    setup: tuple[Path, Path], ranked: tuple[Ranking, Path], tmp_path: Path
) -> None:
    model, calib = setup
    output = tmp_path / "ranking.json"
    shutil.copy(ranked[1], output)
    changed = tmp_path / "calib.jsonl"
    changed.write_text(calib.read_text().splitlines()[2])  # the sample whose image path is absolute
    with pytest.raises(RlensError, match="different calibration file; delete it"):
        rank_layers(model, changed, output, progress=False, **PARAMS)
    with pytest.raises(RlensError, match="different parameters"):
        rank_layers(model, calib, output, progress=False, **{**PARAMS, "hollow_window": 8})
    assert output.read_text() == ranked[1].read_text()  # untouched


def test_plot_is_a_png(ranked: tuple[Ranking, Path], tmp_path: Path) -> None:
    path = plot_ranking(ranked[0], tmp_path / "plots" / "ranking.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ('{"image": "a.png", "prompt": "hi"}\n{"image": ', "line 2: not valid JSON"),
        ('{"image": "a.png"}', 'line 1: missing string key "prompt"'),
        ('["a.png", "hi"]', "line 1: expected a JSON object"),
        ('{"image": "missing.png", "prompt": "hi"}', "line 1: cannot read image"),
        ('{"image": "not-an-image.png", "prompt": "hi"}', "line 1: cannot read image"),
        ('{"image": "a.png", "prompt": "hi", "answer": 3}', '"answer" must be a string'),
        ("\n", "has no samples"),
    ],
)
def test_calibration_file_errors(tmp_path: Path, content: str | None, message: str) -> None:
    make_image(0).save(tmp_path / "a.png")
    (tmp_path / "not-an-image.png").write_text("text")
    path = tmp_path / "calib.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RlensError, match=message) as error:
        read_calibration(path)
    assert "\n" not in str(error.value)


def test_ranking_file_errors(ranked: tuple[Ranking, Path], tmp_path: Path) -> None:
    with pytest.raises(RlensError, match="does not exist; make one with rlens rank"):
        read_ranking(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(RlensError, match="is not a valid ranking file"):
        read_ranking(corrupt)
    data = json.loads(ranked[1].read_text())
    data["hollow"]["order"] = [0, 0, 1, 2]
    corrupt.write_text(json.dumps(data))
    with pytest.raises(RlensError, match="not a list of distinct layers"):
        read_ranking(corrupt)
