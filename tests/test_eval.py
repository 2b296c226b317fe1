"""``rlens eval``: reading a question set, scoring, the report, and the command's one-line errors."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rlens.cli import eval as eval_cmd
from rlens.cli.main import main as rlens_main
from rlens.cli.main import run_cli
from rlens.errors import RlensError
from rlens.eval import EvalReport, evaluate, evaluate_artifact, read_eval_set
from rlens.tiny import TinySpec, make_tiny_llava
from rlens.toy.data import KINDS, toy_set, write_jsonl


def rlens_eval(*argv: str) -> int:
    """``rlens eval ...`` through the CLI's error handling, without needing the subcommand registered."""
    parser = argparse.ArgumentParser(prog="rlens")
    eval_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return run_cli(parser.parse_args(["eval", *argv]))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-model")
    checkpoint = make_tiny_llava(root / "checkpoint", TinySpec(num_layers=1))
    out = root / "artifact"
    assert rlens_main(["export", str(checkpoint), "-o", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(toy_set(8, seed=0), tmp_path_factory.mktemp("toy") / "data.jsonl")


def check_report(report: EvalReport, count: int) -> None:
    assert report.count == count == len(report.predictions)
    assert sum(r.count for r in report.per_kind.values()) == count
    assert sum(r.correct for r in report.per_kind.values()) == report.correct
    assert 0.0 <= report.accuracy <= 1.0
    assert all(0.0 <= r.accuracy <= 1.0 for r in report.per_kind.values())


def test_evaluate_exported_model(artifact: Path, data: Path) -> None:
    report = evaluate_artifact(artifact, data, max_new_tokens=4, batch_size=3)
    check_report(report, 8)
    assert list(report.per_kind) == [*KINDS]  # first appearance order
    assert {k: r.count for k, r in report.per_kind.items()} == {
        "colour": 2,
        "shape": 2,
        "count": 1,
        "exists": 1,
        "position": 1,
        "relative": 1,
    }
    assert report.mean_visual_tokens == 16
    assert report.mean_ttft_ms > 0 and report.median_ttft_ms > 0
    assert report.to_json()["per_kind"]["colour"]["count"] == 2
    json.dumps(report.to_json())
    # the same answers one at a time (greedy: batching changes nothing)
    single = evaluate_artifact(artifact, data, max_new_tokens=4, batch_size=1, limit=5)
    check_report(single, 5)
    assert [p.prediction for p in single.predictions] == [p.prediction for p in report.predictions[:5]]


class FakePipeline:
    """Answers with given texts, in order, recording the batches it was asked."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.batches: list[int] = []

    def generate_batch(
        self, images: Sequence[Any], prompts: Sequence[str], max_new_tokens: int | None = None, **options: Any
    ) -> list[SimpleNamespace]:
        assert options == {"do_sample": False} and max_new_tokens == 8
        self.batches.append(len(prompts))
        texts, self.texts = self.texts[: len(prompts)], self.texts[len(prompts) :]
        return [
            SimpleNamespace(text=t, num_visual_tokens=16, ttft_ms=10.0 * len(self.batches)) for t in texts
        ]


def test_scoring_with_a_fake_pipeline(data: Path) -> None:
    samples = read_eval_set(data)
    right = FakePipeline([f"The {s.answer.upper()}." for s in samples])
    report = evaluate(right, samples, batch_size=3)
    assert right.batches == [3, 3, 2]
    check_report(report, 8)
    assert report.accuracy == 1.0 and all(r.accuracy == 1.0 for r in report.per_kind.values())
    assert report.mean_ttft_ms == pytest.approx((3 * 10 + 3 * 20 + 2 * 30) / 8)
    assert report.median_ttft_ms == 20.0

    wrong = {"yes": "no", "no": "yes"}
    report = evaluate(FakePipeline([wrong.get(s.answer, s.answer + "x") for s in samples]), samples)
    check_report(report, 8)
    assert report.correct == 0 and report.accuracy == 0.0


def test_lines_without_kind_count_as_all(tmp_path: Path, data: Path) -> None:
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    path = tmp_path / "plain.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(
                {k: str(data.parent / v) if k == "image" else v for k, v in line.items() if k != "kind"}
            )
            for line in lines[:3]
        )
        + "\n\n",
        encoding="utf-8",
    )
    samples = read_eval_set(path)
    assert [s.kind for s in samples] == ["all"] * 3
    report = evaluate(FakePipeline([s.answer for s in samples]), samples)
    assert list(report.per_kind) == ["all"] and report.accuracy == 1.0


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json\n", "line 1: not valid JSON"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
        ('\n{"image": "images/000000.png", "prompt": "q?"}\n', 'line 2: missing string key "answer"'),
        ('{"image": "nowhere.png", "prompt": "q?", "answer": "red"}\n', "line 1: cannot read image"),
        ('{"image": "data.jsonl", "prompt": "q?", "answer": "red"}\n', "line 1: cannot read image"),
        ('{"image": "images/000000.png", "prompt": "q?", "answer": "red", "kind": 3}\n', '"kind" must be'),
        ("\n", "has no samples"),
    ],
)
def test_bad_data_files(data: Path, content: str, needle: str) -> None:
    path = data.parent / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RlensError) as error:
        read_eval_set(path)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_cli(artifact: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "toy" / "set.jsonl"
    assert rlens_eval("--toy-set", "6", "--seed", "1", "-o", str(out)) == 0
    assert len(out.read_text().splitlines()) == 6 and (out.parent / "images" / "000005.png").is_file()
    capsys.readouterr()

    predictions = tmp_path / "predictions.jsonl"
    code = rlens_eval(
        str(artifact), "--data", str(out), "--json", "--limit", "4", "--max-new-tokens", "2",
        "--predictions", str(predictions),
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 4 and report["mean_visual_tokens"] == 16 and report["max_new_tokens"] == 2
    assert sum(k["count"] for k in report["per_kind"].values()) == 4
    assert len(predictions.read_text().splitlines()) == 4

    assert (
        rlens_eval(str(artifact), "--data", str(data), "--batch-size", "4", "--max-new-tokens", "2", "-q")
        == 0
    )
    table = capsys.readouterr().out
    assert "overall" in table and "position" in table and "accuracy" in table


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--data", "{data}"], "give OUT_DIR and --data"),
        (["{artifact}"], "give OUT_DIR and --data"),
        (["{artifact}", "--data", "{tmp}/missing.jsonl"], "does not exist"),
        (["{artifact}", "--data", "{data}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["{artifact}", "--data", "{data}", "--limit", "0"], "--limit must be at least 1"),
        (["{tmp}/no-artifact", "--data", "{data}"], ""),
        (["--toy-set", "4"], "needs -o"),
        (["--toy-set", "0", "-o", "{tmp}/x.jsonl"], "at least 1"),
        (["{artifact}", "--toy-set", "4", "-o", "{tmp}/x.jsonl"], "leave out OUT_DIR"),
    ],
)
def test_cli_errors(
    argv: list[str],
    needle: str,
    artifact: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.format(artifact=artifact, data=data, tmp=tmp_path) for a in argv]
    assert rlens_eval(*argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlens: error: ") and needle in lines[0], err
