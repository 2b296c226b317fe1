"""Accuracy of an exported pipeline on a question-answer set (``rlens eval``).

The set is JSON lines, the calibration format of ``rlens rank`` with a required answer and an optional
kind: ``{"image": path, "prompt": str, "answer": str, "kind": str (optional)}``; relative image paths
resolve against the file's directory. :func:`rlens.toy.data.write_jsonl` writes such sets. Lines without
``"kind"`` are counted under ``"all"``.

Answers are generated greedily (``do_sample=False``), ``batch_size`` questions per
``Pipeline.generate_batch`` call, and scored with :func:`rlens.toy.data.is_correct` (exact match after
normalization, or the prediction starts with the answer followed by a word boundary).

Timing: ``generate_batch`` measures one time to first token for the whole batch, and every row of the
batch reports it. The mean and median TTFT here are over rows, so with ``batch_size > 1`` they are the
batches' TTFTs weighted by batch size (the time to the first token of a whole batch, not of one question).
With ``batch_size=1`` they are per question.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rlens.errors import RlensError
from rlens.question_set import Question, read_questions
from rlens.toy.data import is_correct

EvalSample = Question


@dataclass
class KindResult:
    count: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    def to_json(self) -> dict[str, object]:
        return {"count": self.count, "correct": self.correct, "accuracy": self.accuracy}


@dataclass
class Prediction:
    line: int
    kind: str
    prompt: str
    answer: str
    prediction: str
    correct: bool
    num_visual_tokens: int
    ttft_ms: float

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class EvalReport:
    """Accuracy overall and per kind (kinds in order of first appearance), visual tokens, TTFT."""

    count: int
    correct: int
    per_kind: dict[str, KindResult]
    mean_visual_tokens: float
    mean_ttft_ms: float
    median_ttft_ms: float
    batch_size: int
    max_new_tokens: int
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    def to_json(self) -> dict[str, object]:
        """Everything but the per-line predictions."""
        return {
            "count": self.count,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "per_kind": {kind: result.to_json() for kind, result in self.per_kind.items()},
            "mean_visual_tokens": self.mean_visual_tokens,
            "mean_ttft_ms": self.mean_ttft_ms,
            "median_ttft_ms": self.median_ttft_ms,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
        }


class Generator(Protocol):
    """What :func:`evaluate` needs of a pipeline: ``generate_batch`` returning objects with ``text``,
    ``num_visual_tokens`` and ``ttft_ms`` (``rlens.runtime.pipeline.Pipeline``, or a fake in tests)."""

    def generate_batch(
        self, images: Sequence[Any], prompts: Sequence[str], max_new_tokens: int | None = None, **options: Any
    ) -> list[Any]: ...


def _check_options(max_new_tokens: int, batch_size: int, limit: int | None = None) -> None:
    options = (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size), ("--limit", limit))
    for name, value in options:
        if value is not None and value < 1:
            raise RlensError(f"{name} must be at least 1, got {value}")


def read_eval_set(path: str | Path, limit: int | None = None) -> list[EvalSample]:
    """An evaluation file (see ``rlens.question_set``; answers required); ``limit`` keeps the first N."""
    return read_questions(
        path,
        what="data file",
        answer_required=True,
        limit=limit,
        hint=" (`rlens eval --toy-set N -o DATA.jsonl` writes one)",
    )


def evaluate(
    pipeline: Generator,
    samples: Sequence[EvalSample],
    max_new_tokens: int = 8,
    batch_size: int = 8,
    progress: bool = False,
) -> EvalReport:
    """Answer every sample greedily, ``batch_size`` at a time, and score the answers."""
    _check_options(max_new_tokens, batch_size)
    if not samples:
        raise RlensError("nothing to evaluate: the data set is empty")
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), desc="eval", unit="question")
        except ImportError:  # tqdm comes with rlens[export]; the runtime alone goes without a bar
            bar = None
    per_kind: dict[str, KindResult] = {}
    predictions: list[Prediction] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        results = pipeline.generate_batch(
            [s.image for s in batch], [s.prompt for s in batch], max_new_tokens, do_sample=False
        )
        for sample, result in zip(batch, results, strict=True):
            correct = is_correct(result.text, sample.answer)
            kind = per_kind.setdefault(sample.kind, KindResult())
            kind.count += 1
            kind.correct += int(correct)
            predictions.append(
                Prediction(
                    line=sample.line,
                    kind=sample.kind,
                    prompt=sample.prompt,
                    answer=sample.answer,
                    prediction=result.text,
                    correct=correct,
                    num_visual_tokens=int(result.num_visual_tokens),
                    ttft_ms=float(result.ttft_ms),
                )
            )
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    ttfts = [p.ttft_ms for p in predictions]
    return EvalReport(
        count=len(predictions),
        correct=sum(p.correct for p in predictions),
        per_kind=per_kind,
        mean_visual_tokens=statistics.fmean(p.num_visual_tokens for p in predictions),
        mean_ttft_ms=statistics.fmean(ttfts),
        median_ttft_ms=statistics.median(ttfts),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        predictions=predictions,
    )


def evaluate_artifact(
    artifact_dir: str | Path,
    data: str | Path,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    limit: int | None = None,
    provider: str = "cpu",
    progress: bool = False,
) -> EvalReport:
    """Read ``data`` (first ``limit`` samples), load the exported pipeline, :func:`evaluate`."""
    from rlens.runtime.pipeline import Pipeline

    _check_options(max_new_tokens, batch_size, limit)
    samples = read_eval_set(data, limit)
    pipeline = Pipeline.load(artifact_dir, provider=provider)
    return evaluate(pipeline, samples, max_new_tokens, batch_size, progress)
