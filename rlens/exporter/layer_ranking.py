"""The Layer Ranking Algorithm (RedundancyLens): which decoder layers to reduce first.

Two priority lists, one for Hollow Attention and one for PAD-FFN, each by greedy forward selection::

    S = []
    repeat L times:
        for each layer l not in S: score(S + [l]) on the calibration set
        append the l with the lowest score to S (ties: the lower layer index)

``L(L+1)/2`` evaluations per list, ``L(L+1)`` for both. A budget is a prefix of each list.

Score of a layer set (METHODS.md leaves it open; this is the choice):

    score(S) = mean over calibration samples of
               mean over the sample's answer positions of KL(p_unreduced || p_reduced(S))

where the answer positions are the columns whose next token is an answer token (the last prompt
column and every answer column but the last), the input is the prompt followed by the answer tokens
(teacher forcing), and p is the next-token distribution (softmax of the logits, KL in float64). The
answer is the sample's ``"answer"`` as the chat template renders an assistant turn (the end-of-turn
token included), or, where none is given, the unreduced model's own greedy answer (up to 16 tokens,
the EOS included if it comes). 0 means the reduction changes nothing the answer depends on.

The unreduced distributions and the unreduced residual stream at every layer boundary are computed
once per sample. A candidate set's forward starts at its earliest layer from the cached stream: the
layers below it are unreduced, so their activations do not depend on the set.

``rank_layers`` writes the ranking file after every selection step (temp file + rename), with a
fingerprint of the model, the calibration file and the parameters; a rerun with the same ones goes
on from the recorded prefix, so an interrupted ranking loses at most one step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlens import toy
from rlens.errors import RlensError
from rlens.question_set import Question, read_questions
from rlens.reductions import DEFAULT_FFN_KEEP, DEFAULT_HOLLOW_WINDOW, DEFAULT_PROBE_EVERY, Reductions

if TYPE_CHECKING:
    import torch

    from rlens.exporter.reference import ReferenceInputs

RANKING_VERSION = 1
SELF_ANSWER_TOKENS = 16
"""How many tokens of its own greedy answer the unreduced model gives a sample without an answer."""
SCORE = f"mean KL(unreduced || reduced) at answer positions; self-answer {SELF_ANSWER_TOKENS} tokens"
"""Recorded in the fingerprint, so a changed score definition never resumes an old file."""
KINDS = ("hollow", "ffn")
KIND_NAMES = {"hollow": "Hollow Attention", "ffn": "PAD-FFN"}


# -- the calibration file ----------------------------------------------------------------------


CalibrationSample = Question


def read_calibration(path: str | Path) -> list[CalibrationSample]:
    """A calibration file: ``{"image": path, "prompt": str, "answer": str (optional)}`` per line."""
    return read_questions(path, what="calibration file", answer_required=False)


# -- scoring -----------------------------------------------------------------------------------


@dataclass
class CachedSample:
    """A teacher-forced calibration sample with its unreduced activations, computed once."""

    inputs: ReferenceInputs
    positions: torch.Tensor  # [N] columns whose next token is an answer token
    boundaries: list[torch.Tensor]  # L + 1 unreduced streams [1, S, d]: entering layer i, and the output
    log_p: torch.Tensor  # [N, vocab] float64 unreduced next-token log-probabilities at ``positions``


def chat_text(processor: Any, prompt: str, answer: str | None = None) -> str:
    """The prompt as the checkpoint's chat template renders it, image first; with ``answer``, the
    conversation including the assistant turn (for teacher forcing on a given answer)."""
    if not getattr(processor, "chat_template", None):
        image_token = getattr(processor, "image_token", None) or "<image>"
        return f"{image_token}\n{prompt}" + ("" if answer is None else f" {answer}")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False)


def answer_ids(processor: Any, sample: CalibrationSample, prompt_ids: list[int]) -> list[int]:
    """The tokens of the sample's answer after the prompt, as the template renders and the tokenizer
    splits them.

    Tokenizing the whole conversation and cutting the prompt off keeps the tokenizer's context (a
    leading space, say) as it is at generation time; where the prompt's tokens are not a prefix of the
    conversation's, the text after the prompt is tokenized on its own.
    """
    assert sample.answer is not None
    prompt_text = chat_text(processor, sample.prompt)
    full_text = chat_text(processor, sample.prompt, sample.answer)
    full = processor(images=sample.image, text=full_text)["input_ids"][0]
    full = list(full.tolist() if hasattr(full, "tolist") else full)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids) :]
    rest = full_text[len(prompt_text) :] if full_text.startswith(prompt_text) else f" {sample.answer}"
    return list(processor.tokenizer(rest, add_special_tokens=False)["input_ids"])


def eos_token_ids(model: Any, processor: Any) -> list[int]:
    """The ids that end a greedy answer: the generation config's, else the tokenizer's EOS."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else [int(e) for e in eos or []]


class LayerScorer:
    """Scores layer sets on a calibration set against the cached unreduced model (see the module docs)."""

    def __init__(
        self,
        model: Any,
        samples: list[CachedSample],
        *,
        hollow_window: int,
        ffn_keep: float,
        probe_every: int,
    ) -> None:
        self.model = model
        self.samples = samples
        self.hollow_window = hollow_window
        self.ffn_keep = ffn_keep
        self.probe_every = probe_every
        self.num_layers = len(samples[0].boundaries) - 1

    @classmethod
    def build(
        cls,
        model: Any,
        processor: Any,
        calibration: list[CalibrationSample],
        *,
        hollow_window: int,
        ffn_keep: float,
        probe_every: int,
        progress: bool = False,
    ) -> LayerScorer:
        """Teacher-force every sample through the unreduced model once and keep what scoring reuses."""
        from tqdm import tqdm

        samples = [
            cache_sample(model, processor, sample)
            for sample in tqdm(calibration, desc="calibration", unit="sample", disable=not progress)
        ]
        return cls(model, samples, hollow_window=hollow_window, ffn_keep=ffn_keep, probe_every=probe_every)

    def reductions(self, kind: str, layers: list[int] | tuple[int, ...]) -> Reductions:
        """The reductions of one list's candidate set: hollow layers or PAD-FFN layers, never both."""
        params = {
            "hollow_window": self.hollow_window,
            "ffn_keep": self.ffn_keep,
            "probe_every": self.probe_every,
        }
        if kind == "hollow":
            return Reductions(hollow_layers=tuple(sorted(layers)), **params)
        assert kind == "ffn", kind
        return Reductions(ffn_layers=tuple(sorted(layers)), **params)

    def score(self, kind: str, layers: list[int] | tuple[int, ...], reuse_activations: bool = True) -> float:
        """Mean over samples of the mean KL(unreduced || reduced) at the answer positions.

        With ``reuse_activations`` the forward starts at the earliest reduced layer from the cached
        unreduced stream; without, from the embeddings (the same number, computed the long way).
        """
        from rlens.exporter.reference import ReducedDecoder

        assert layers, "score a non-empty layer set"
        decoder = ReducedDecoder(self.model, self.reductions(kind, layers))
        start = min(layers) if reuse_activations else 0
        total = 0.0
        for sample in self.samples:
            hidden = decoder.hidden_states(sample.inputs, start, sample.boundaries[start])
            log_q = decoder.head(hidden[0, sample.positions]).double().log_softmax(dim=-1)
            total += float((sample.log_p.exp() * (sample.log_p - log_q)).sum(dim=-1).mean())
        return total / len(self.samples)


def cache_sample(model: Any, processor: Any, sample: CalibrationSample) -> CachedSample:
    """Prompt + answer (given, or the model's own greedy one), its unreduced streams and log-probs."""
    import torch

    from rlens.exporter.reference import ReducedDecoder, prepare_inputs

    encoded = processor(images=sample.image, text=chat_text(processor, sample.prompt), return_tensors="pt")
    prompt = encoded["input_ids"]  # [1, Sp]
    unreduced = ReducedDecoder(model)
    if sample.answer is None:
        answer = unreduced.generate(
            prompt, encoded["pixel_values"], SELF_ANSWER_TOKENS, eos_token_ids(model, processor)
        )
    else:
        answer = answer_ids(processor, sample, prompt[0].tolist())
    if not answer:
        raise RlensError(f"calibration line {sample.line}: the answer has no tokens; give a non-empty answer")
    # the last answer token is never an input: no position predicts what follows it
    ids = torch.cat([prompt, torch.tensor([answer[:-1]], dtype=prompt.dtype)], dim=1)
    inputs = prepare_inputs(model, ids, encoded["pixel_values"])
    positions = torch.arange(prompt.shape[1] - 1, ids.shape[1])
    boundaries = [inputs.inputs_embeds]
    for i in range(unreduced.num_layers):
        boundaries.append(unreduced.hidden_states(inputs, i, boundaries[-1], i + 1))
    log_p = unreduced.head(boundaries[-1][0, positions]).double().log_softmax(dim=-1)
    return CachedSample(inputs, positions, boundaries, log_p)


def load_scorer(
    model_dir: str | Path,
    calib_path: str | Path,
    *,
    hollow_window: int = DEFAULT_HOLLOW_WINDOW,
    ffn_keep: float = DEFAULT_FFN_KEEP,
    probe_every: int = DEFAULT_PROBE_EVERY,
    progress: bool = False,
) -> LayerScorer:
    """A :class:`LayerScorer` for a checkpoint directory and a calibration file."""
    Reductions(hollow_window=hollow_window, ffn_keep=ffn_keep, probe_every=probe_every)  # validates them
    return build_scorer(
        Path(model_dir), read_calibration(calib_path), hollow_window, ffn_keep, probe_every, progress
    )


def build_scorer(
    model_dir: Path,
    calibration: list[CalibrationSample],
    hollow_window: int,
    ffn_keep: float,
    probe_every: int,
    progress: bool,
) -> LayerScorer:
    """Load the checkpoint and cache the unreduced activations of every calibration sample."""
    from rlens.exporter.checkpoint import load_model, load_processor

    return LayerScorer.build(
        load_model(model_dir),
        load_processor(model_dir),
        calibration,
        hollow_window=hollow_window,
        ffn_keep=ffn_keep,
        probe_every=probe_every,
        progress=progress,
    )


# -- the ranking file --------------------------------------------------------------------------


@dataclass
class Ranking:
    """The two priority lists and the score after adding each layer; a prefix of each is a budget."""

    num_layers: int
    hollow_window: int
    ffn_keep: float
    probe_every: int
    hollow_order: list[int] = field(default_factory=list)
    hollow_scores: list[float] = field(default_factory=list)
    ffn_order: list[int] = field(default_factory=list)
    ffn_scores: list[float] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.hollow_order) == len(self.ffn_order) == self.num_layers

    @property
    def parameters(self) -> dict[str, Any]:
        return {
            "hollow_window": self.hollow_window,
            "ffn_keep": self.ffn_keep,
            "probe_every": self.probe_every,
        }

    def order(self, kind: str) -> list[int]:
        return self.hollow_order if kind == "hollow" else self.ffn_order

    def scores(self, kind: str) -> list[float]:
        return self.hollow_scores if kind == "hollow" else self.ffn_scores

    def evaluations_done(self) -> int:
        """Score evaluations the recorded steps took (a step with r candidates left takes r)."""
        done = (len(self.hollow_order), len(self.ffn_order))
        return sum(self.num_layers * n - n * (n - 1) // 2 for n in done)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RANKING_VERSION,
            "fingerprint": self.fingerprint,
            "num_layers": self.num_layers,
            "parameters": self.parameters,
            "hollow": {"order": self.hollow_order, "scores": self.hollow_scores},
            "ffn": {"order": self.ffn_order, "scores": self.ffn_scores},
            "complete": self.complete,
        }

    @classmethod
    def from_json(cls, data: Any) -> Ranking:
        """Parse and check a ranking file's content; ValueError says what is wrong."""
        if not isinstance(data, dict) or data.get("version") != RANKING_VERSION:
            raise ValueError(f"not a version {RANKING_VERSION} ranking")
        layers, params = data.get("num_layers"), data.get("parameters")
        if not isinstance(layers, int) or layers < 1 or not isinstance(params, dict):
            raise ValueError("num_layers or parameters missing")
        try:
            ranking = cls(
                num_layers=layers,
                hollow_window=int(params["hollow_window"]),
                ffn_keep=float(params["ffn_keep"]),
                probe_every=int(params["probe_every"]),
                hollow_order=[int(i) for i in data["hollow"]["order"]],
                hollow_scores=[float(x) for x in data["hollow"]["scores"]],
                ffn_order=[int(i) for i in data["ffn"]["order"]],
                ffn_scores=[float(x) for x in data["ffn"]["scores"]],
                fingerprint=dict(data.get("fingerprint") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad or missing field {e}") from None
        for kind in KINDS:
            order, scores = ranking.order(kind), ranking.scores(kind)
            if len(set(order)) != len(order) or any(not 0 <= i < layers for i in order):
                raise ValueError(f"the {kind} order {order} is not a list of distinct layers 0..{layers - 1}")
            if len(scores) != len(order) or not all(math.isfinite(x) for x in scores):
                raise ValueError(f"the {kind} scores do not match its order")
        if ranking.ffn_order and len(ranking.hollow_order) != layers:
            raise ValueError("the ffn list is started before the hollow list is finished")
        if data.get("complete") != ranking.complete:
            raise ValueError("the complete flag does not match the lists")
        return ranking


def _load_ranking(path: Path) -> Ranking:
    """A ranking file, complete or not; RlensError if it cannot be read or is not a ranking."""
    try:
        return Ranking.from_json(json.loads(path.read_text(encoding="utf-8")))
    except OSError as e:
        raise RlensError(f"cannot read the ranking file '{path}' ({e.strerror})") from e
    except ValueError as e:
        raise RlensError(
            f"'{path}' is not a valid ranking file ({str(e).splitlines()[0]}); rerun rlens rank to remake it"
        ) from e


def read_ranking(path: str | Path) -> Ranking:
    """A complete ranking file, as ``rank_layers`` writes it."""
    path = Path(path)
    if not path.is_file():
        raise RlensError(f"ranking file '{path}' does not exist; make one with rlens rank")
    ranking = _load_ranking(path)
    if not ranking.complete:
        raise RlensError(
            f"'{path}' is an unfinished ranking ({len(ranking.hollow_order)}/{ranking.num_layers} hollow and "
            f"{len(ranking.ffn_order)}/{ranking.num_layers} FFN layers ranked); rerun rlens rank with the "
            "same arguments to finish it"
        )
    return ranking


def _write_ranking(path: Path, ranking: Ranking) -> None:
    """Atomically: a reader (or a crash) sees the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(ranking.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(model_dir: Path, calib_path: Path) -> dict[str, Any]:
    """What a ranking depends on besides its parameters: the model and the calibration file.

    The model is its config.json's hash plus the names and sizes of its weight files (hashing
    gigabytes of weights would cost more than a ranking step); the calibration file is hashed whole
    (the images it names are not).
    """
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {
        "model_config_sha256": _sha256(model_dir / "config.json"),
        "model_weights": {p.name: p.stat().st_size for p in weights},
        "calibration_sha256": _sha256(calib_path),
        "score": SCORE,
    }


FINGERPRINT_NAMES = {
    "model_config_sha256": "model",
    "model_weights": "model",
    "calibration_sha256": "calibration file",
    "parameters": "parameters",
    "score": "score definition",
}
"""What a refusal calls each part of the fingerprint (and the parameters)."""


def _resume(output_path: Path, fresh: Ranking) -> Ranking:
    """The ranking to continue: the recorded one if it matches ``fresh``'s inputs, else a refusal."""
    if not output_path.exists():
        return fresh
    recorded = _load_ranking(output_path)
    mismatched = {key for key, value in fresh.fingerprint.items() if recorded.fingerprint.get(key) != value}
    if recorded.num_layers != fresh.num_layers:
        mismatched.add("model_config_sha256")
    if recorded.parameters != fresh.parameters:
        mismatched.add("parameters")
    differs = list(dict.fromkeys(FINGERPRINT_NAMES[key] for key in FINGERPRINT_NAMES if key in mismatched))
    if differs:
        raise RlensError(
            f"'{output_path}' holds a ranking made with a different {' and '.join(differs)}; delete it or "
            "choose another output path to rank anew"
        )
    return recorded


# -- greedy forward selection ------------------------------------------------------------------


def rank_layers(
    model_dir: str | Path,
    calib_path: str | Path,
    output_path: str | Path,
    *,
    hollow_window: int = DEFAULT_HOLLOW_WINDOW,
    ffn_keep: float = DEFAULT_FFN_KEEP,
    probe_every: int = DEFAULT_PROBE_EVERY,
    progress: bool = True,
) -> Ranking:
    """Rank the layers for Hollow Attention and for PAD-FFN; write ``output_path`` after every step.

    An existing ``output_path`` made from the same model, calibration file and parameters is
    continued from its recorded prefix (returned as is when complete); one made from others is
    refused rather than overwritten.
    """
    from transformers import AutoConfig

    from rlens.exporter.checkpoint import read_config

    model_dir, calib_path, output_path = toy.resolve(model_dir), Path(calib_path), Path(output_path)
    Reductions(hollow_window=hollow_window, ffn_keep=ffn_keep, probe_every=probe_every)  # validates them
    read_config(model_dir)
    calibration = read_calibration(calib_path)
    num_layers = AutoConfig.from_pretrained(model_dir).text_config.num_hidden_layers
    fresh = Ranking(
        num_layers, hollow_window, ffn_keep, probe_every, fingerprint=fingerprint(model_dir, calib_path)
    )
    ranking = _resume(output_path, fresh)
    if ranking.complete:
        return ranking

    scorer = build_scorer(model_dir, calibration, hollow_window, ffn_keep, probe_every, progress)
    for _ in _select(scorer, ranking, progress):
        _write_ranking(output_path, ranking)
    return ranking


def _select(scorer: LayerScorer, ranking: Ranking, progress: bool) -> Iterator[None]:
    """Greedy forward selection, hollow list then FFN list, from wherever ``ranking`` stands.

    Yields after each appended layer, so the caller records every step.
    """
    from tqdm import tqdm

    layers = ranking.num_layers
    with tqdm(
        total=layers * (layers + 1),
        initial=ranking.evaluations_done(),
        desc="ranking layers",
        unit="eval",
        disable=not progress,
    ) as bar:
        for kind in KINDS:
            order, scores = ranking.order(kind), ranking.scores(kind)
            while len(order) < layers:
                bar.set_postfix_str(f"{kind} list, step {len(order) + 1}/{layers}")
                best: tuple[float, int] | None = None
                for layer in range(layers):
                    if layer in order:
                        continue
                    score = scorer.score(kind, [*order, layer])
                    bar.update(1)
                    if best is None or score < best[0]:
                        best = (score, layer)
                assert best is not None
                scores.append(best[0])
                order.append(best[1])
                yield


# -- the chart ---------------------------------------------------------------------------------


def plot_ranking(ranking: Ranking, png_path: str | Path) -> Path:
    """A PNG of the score against the number of reduced layers, both lists on one chart.

    Each point is labelled with the layer added at that step (hollow labels above the points, FFN
    labels below), so the chart reads as the two priority lists too. matplotlib is imported here, so
    ranking works without it.
    """
    try:
        import matplotlib
    except ImportError:
        raise RlensError("plotting the ranking needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    png_path = Path(png_path)
    fig = Figure(figsize=(8, 4.8), dpi=120)
    ax = fig.subplots()
    for kind, marker, offset in zip(KINDS, ("o", "s"), (6, -11), strict=True):
        order, scores = ranking.order(kind), ranking.scores(kind)
        if not scores:
            continue
        steps = list(range(1, len(scores) + 1))
        (line,) = ax.plot(steps, scores, marker=marker, markersize=4, label=f"{KIND_NAMES[kind]} list")
        for step, score, layer in zip(steps, scores, order, strict=True):  # hollow labels above, FFN below
            ax.annotate(
                str(layer),
                (step, score),
                textcoords="offset points",
                xytext=(0, offset),
                fontsize=6,
                ha="center",
                color=line.get_color(),
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of reduced layers (prefix of the priority list)")
    ax.set_ylabel("mean KL(unreduced || reduced) at answer positions")
    ax.set_title(
        f"Layer ranking ({ranking.num_layers} layers): hollow window {ranking.hollow_window}, "
        f"FFN keep {ranking.ffn_keep:g}, probe every {ranking.probe_every}"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")
    return png_path
