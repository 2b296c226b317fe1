"""The runtime: an artifact directory in, answers out, with ONNX Runtime (or TensorRT engines).

    image --preprocess--> pixel_values --vision--> image_features --+
    question --PromptEncoder--> prompt_ids -------------------------+--embedding--> inputs_embeds
    inputs_embeds --decoder (prefill)--> logits, KV cache --sample--> token
    token --embedding--> --decoder (decode_one_token)--> ... until EOS or max_new_tokens

Read top to bottom: ``encode_images``, ``prefill``, ``decode_one_token``, ``generate_tokens``,
``generate_batch``. Everything the pipeline needs to know comes from ``rlens.json``. This module
imports no torch and no transformers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlens.errors import RlensError
from rlens.manifest import Manifest, read_manifest
from rlens.runtime.preprocess import ImageInput, preprocess
from rlens.runtime.prompt import InstructionEncoder, PromptEncoder, stream_text
from rlens.runtime.sampling import SamplingOptions, sample
from rlens.runtime.sessions import graph_opener


@dataclass
class Generation:
    """One answer and how it was produced."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    num_visual_tokens: int
    ttft_ms: float
    decode_tokens_per_s: float
    finish_reason: str  # "eos" or "length"

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class DecoderState:
    """The KV cache of a batch in flight and its attention mask; both grow by one position a step."""

    attention_mask: np.ndarray  # [B, T] int64, 0 on left padding
    positions: np.ndarray  # [B, 1] int64, position id of the last token fed
    cache: dict[str, Any] = field(default_factory=dict)  # numpy; on a GPU, OrtValues or torch tensors


@dataclass(frozen=True)
class VisualSpan:
    """Where a chunk's visual tokens are: from column ``start``, ``lengths[b]`` of them in row b."""

    start: int
    lengths: list[int]


def batch_layout(
    prompts: list[list[int]], image_token_id: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, VisualSpan]:
    """Pad prompts into one batch so every row's image starts at the same column.

        row b:  [pads][text before image][V_b image tokens][pads][text after image]
                      └──── start column shared by all rows ┘

    Pads sit in front of the text before the image (to align the image) and between the image
    and the text after it (to align the ends), so every row's last column is its last real
    token. Padding is masked and skipped by the positions, so each row computes what it would
    alone; the shared span is what the reduced decoder layers need. Rows without an image are
    all text after a zero-length image. Returns ids [B, L], attention mask [B, L] and the span.
    """
    parts = []
    for ids in prompts:
        count = ids.count(image_token_id)
        at = ids.index(image_token_id) if count else 0
        parts.append((ids[:at], count, ids[at + count :]))
    start = max(len(before) for before, _, _ in parts)
    widest = max(count for _, count, _ in parts)
    longest_after = max(len(after) for _, _, after in parts)
    rows, masks = [], []
    for before, count, after in parts:
        lead, gap = start - len(before), widest - count + longest_after - len(after)
        rows.append([pad_id] * lead + before + [image_token_id] * count + [pad_id] * gap + after)
        masks.append([0] * lead + [1] * (len(before) + count) + [0] * gap + [1] * len(after))
    span = VisualSpan(start, [count for _, count, _ in parts])
    return np.array(rows, np.int64), np.array(masks, np.int64), span


@dataclass(frozen=True)
class GenerateOptions:
    """How long and how to generate; None means "the checkpoint's default" (rlens.json)."""

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Timings:
    """Wall-clock marks of one generation (``time.perf_counter`` seconds)."""

    start: float
    first_token: float = 0.0
    end: float = 0.0


class Pipeline:
    """An exported LLaVA pipeline: ``Pipeline.load(dir).generate(image, prompt)``."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, provider: str) -> None:
        self.artifact_dir = artifact_dir
        self.manifest = manifest
        self.provider = provider
        graphs = manifest.graphs
        for name in ("vision", "embedding", "decoder"):
            if name not in graphs:
                raise RlensError(
                    f"the manifest of '{artifact_dir}' names no '{name}' graph; re-export the model"
                )
        self.open_graph = graph_opener(artifact_dir, manifest, provider)
        self.embedding = self.open_graph("embedding")
        self.decoder = self.open_graph("decoder")
        self.prompts = PromptEncoder(artifact_dir, manifest)
        self.trim = self.open_graph("trim") if manifest.trim else None
        self.instructions = InstructionEncoder(artifact_dir, manifest) if manifest.trim else None
        self.image_config = manifest.image_processor
        self.hidden_size = manifest.model.hidden_size
        decoder_inputs = {t.name for t in graphs["decoder"].inputs}
        self.takes_visual_span = "visual_lengths" in decoder_inputs
        self.span_as_shape = "visual_span" in decoder_inputs  # the TensorRT track's decoder
        self.cache_names = [
            f"past_key_values.{i}.{kv}" for i in range(manifest.model.num_layers) for kv in ("key", "value")
        ]
        cache_type = next(t.dtype for t in graphs["decoder"].inputs if t.name == self.cache_names[0])
        self.cache_dtype = np.float16 if cache_type == "float16" else np.float32  # --precision fp16
        if self.trim is None:
            _ = self.vision  # the graph every image goes through: open it now, so a broken one fails at load

    @functools.cached_property
    def vision(self) -> Any:
        """The plain vision graph, opened on first use: a TRIM pipeline answers through ``trim`` instead."""
        return self.open_graph("vision")

    @classmethod
    def load(cls, artifact_dir: str | Path, provider: str = "cpu") -> Pipeline:
        """Open an artifact directory written by ``rlens export`` on ``cpu``, ``cuda`` or ``tensorrt``."""
        directory = Path(artifact_dir)
        return cls(directory, read_manifest(directory), provider)

    # -- the stages ------------------------------------------------------------------------------
    def encode_images(
        self, images: Sequence[ImageInput], questions: Sequence[str] | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Images -> projected features, one row per visual token [N, d], and the count per image.

        With TRIM the ``trim`` graph scores the tokens against each image's question and returns the
        ones it keeps (a fixed maximum of rows plus a count); without it every image gives V tokens.
        """
        pixel_values = preprocess(list(images), self.image_config)
        if self.trim is None:
            (features,) = self.vision.run(None, {"pixel_values": pixel_values})
            return features.reshape(-1, self.hidden_size), [features.shape[1]] * features.shape[0]
        assert self.instructions is not None and questions is not None
        ids, mask = self.instructions.encode(list(questions))
        padded, counts = self.trim.run(
            None, {"pixel_values": pixel_values, "clip_input_ids": ids, "clip_attention_mask": mask}
        )
        kept = [int(c) for c in counts]
        return np.concatenate([rows[:n] for rows, n in zip(padded, kept, strict=True)]), kept

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        if image_features is None:
            image_features = np.zeros((0, self.hidden_size), np.float32)
        (embeds,) = self.embedding.run(None, {"input_ids": input_ids, "image_features": image_features})
        return embeds

    def run_decoder(
        self, embeds: np.ndarray, positions: np.ndarray, state: DecoderState, span: VisualSpan | None = None
    ) -> np.ndarray:
        """One decoder call over ``embeds`` [B, S, d]; extends the cache; returns last logits [B, vocab].

        A decoder with reductions also reads where the visual tokens of this chunk are; a chunk
        without any (a decode step) passes an empty span.
        """
        feeds = {"inputs_embeds": embeds, "attention_mask": state.attention_mask, "position_ids": positions}
        if self.takes_visual_span:
            span = span or VisualSpan(0, [0] * embeds.shape[0])
            feeds["visual_lengths"] = np.array(span.lengths, np.int64)
            if self.span_as_shape:  # only its shape is read: [start column, widest row's visual tokens]
                feeds["visual_span"] = np.zeros((span.start, max(span.lengths)), np.bool_)
            else:
                feeds["visual_start"] = np.array(span.start, np.int64)
        if not state.cache:
            m = self.manifest.model
            empty = np.zeros((embeds.shape[0], m.num_kv_heads, 0, m.head_dim), self.cache_dtype)
            state.cache = {name: empty for name in self.cache_names}
        feeds.update(state.cache)
        logits, *presents = self.decoder.run(None, feeds)
        state.cache = dict(zip(self.cache_names, presents, strict=True))
        state.positions = positions[:, -1:]
        return logits[:, -1, :]

    def prefill(
        self, prompts: list[list[int]], image_features: np.ndarray | None
    ) -> tuple[np.ndarray, DecoderState]:
        """Lay the prompts out as one batch (``batch_layout``) and run it through the decoder in one call."""
        ids, mask, span = batch_layout(
            prompts, self.manifest.model.image_token_id, self.manifest.tokenizer.pad_token_id
        )
        positions = np.maximum(mask.cumsum(-1) - 1, 0)  # count real tokens only, as transformers does
        state = DecoderState(attention_mask=mask, positions=positions[:, -1:])
        return self.run_decoder(self.embed(ids, image_features), positions, state, span), state

    def decode_one_token(self, tokens: np.ndarray, state: DecoderState) -> np.ndarray:
        """Feed one token per row [B]; returns the next logits [B, vocab]."""
        ones = np.ones((tokens.shape[0], 1), np.int64)
        state.attention_mask = np.concatenate([state.attention_mask, ones], axis=1)
        return self.run_decoder(self.embed(tokens[:, None]), state.positions + 1, state)

    # -- generation ------------------------------------------------------------------------------
    def encode_prompts(
        self, images: Sequence[ImageInput | None], prompts: Sequence[str]
    ) -> tuple[list[list[int]], np.ndarray | None, list[int]]:
        """Prompt ids per row (one image token per visual token), the image features, visual counts."""
        if len(images) != len(prompts):
            raise RlensError(
                f"{len(images)} images for {len(prompts)} prompts; give one image (or None) each"
            )
        rows = [i for i, im in enumerate(images) if im is not None]
        features, counts = None, [0] * len(prompts)
        if rows:
            features, kept = self.encode_images([images[i] for i in rows], [prompts[i] for i in rows])
            for i, n in zip(rows, kept, strict=True):
                counts[i] = n
        ids = [
            self.prompts.encode(p, n if im is not None else None)
            for im, p, n in zip(images, prompts, counts, strict=True)
        ]
        context = self.manifest.model.max_context
        for row, n in zip(ids, counts, strict=True):
            if len(row) >= context:
                raise RlensError(
                    f"the prompt is {len(row)} tokens ({n} of them visual) and the model's "
                    f"context is {context}; shorten the prompt"
                )
        return ids, features, counts

    def generate_tokens(
        self,
        prompts: list[list[int]],
        image_features: np.ndarray | None,
        options: GenerateOptions,
        timings: Timings,
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every row until all rows hit EOS or the token budget."""
        rng = np.random.default_rng(options.seed)
        sampling = self.sampling_options(options)
        eos = np.array(self.manifest.generation.eos_token_ids, dtype=np.int64)
        max_new = options.max_new_tokens or self.manifest.generation.max_new_tokens
        budget = min(max_new, self.manifest.model.max_context - max(len(p) for p in prompts))
        logits, state = self.prefill(prompts, image_features)
        done = np.zeros(len(prompts), dtype=bool)
        image_token = self.manifest.model.image_token_id
        for step in range(budget):
            if image_token < logits.shape[-1]:  # a generated image placeholder would have no features
                logits[:, image_token] = -np.inf
            token = sample(logits, sampling, rng)
            token = np.where(done, self.manifest.tokenizer.pad_token_id, token)  # finished rows idle
            if step == 0:
                timings.first_token = time.perf_counter()
            yield token
            done |= np.isin(token, eos)
            if done.all() or step == budget - 1:
                break
            logits = self.decode_one_token(token, state)

    def generate_batch(
        self,
        images: Sequence[ImageInput | None],
        prompts: Sequence[str],
        max_new_tokens: int | None = None,
        **options: Any,
    ) -> list[Generation]:
        """Answer several (image, prompt) pairs in one batch; each row gets the answer it gets alone.

        ``options``: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed`` (see
        ``GenerateOptions``); unset ones come from the checkpoint's generation config. With one row,
        ``on_text`` (a callable) receives the answer's text piece by piece as it is generated.
        """
        on_text: Callable[[str], None] | None = options.pop("on_text", None)
        timings = Timings(start=time.perf_counter())
        prompt_ids, features, visual = self.encode_prompts(images, prompts)
        eos = set(self.manifest.generation.eos_token_ids)
        step_iter = self.generate_tokens(
            prompt_ids, features, GenerateOptions(max_new_tokens, **options), timings
        )
        if on_text is None:
            steps = list(step_iter)
        else:  # stream the (single) row's text while generating
            if len(prompts) != 1:
                raise RlensError("on_text streams one answer; pass one image and one prompt")
            steps = []

            def answer_tokens() -> Iterator[int]:
                for step in step_iter:
                    steps.append(step)
                    if int(step[0]) in eos:
                        return
                    yield int(step[0])

            for piece in stream_text(self.prompts, answer_tokens()):
                on_text(piece)
        timings.end = time.perf_counter()
        results = []
        for row, ids in enumerate(prompt_ids):
            tokens: list[int] = []
            for step in steps:
                tokens.append(int(step[row]))
                if tokens[-1] in eos:
                    break
            results.append(
                Generation(
                    text=self.prompts.decode(tokens),
                    token_ids=tokens,
                    prompt_ids=ids,
                    num_visual_tokens=visual[row],
                    ttft_ms=(timings.first_token - timings.start) * 1e3,
                    decode_tokens_per_s=_rate(len(steps) - 1, timings.end - timings.first_token),
                    finish_reason="eos" if tokens and tokens[-1] in eos else "length",
                )
            )
        return results

    def generate(
        self, image: ImageInput | None, prompt: str, max_new_tokens: int | None = None, **options: Any
    ) -> Generation:
        """Answer one question about one image (or none); options as ``generate_batch``."""
        return self.generate_batch([image], [prompt], max_new_tokens, **options)[0]

    def stream(
        self, image: ImageInput | None, prompt: str, max_new_tokens: int | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated; options as ``generate_batch``."""
        prompt_ids, features, _ = self.encode_prompts([image], [prompt])
        eos = set(self.manifest.generation.eos_token_ids)
        steps = self.generate_tokens(
            prompt_ids, features, GenerateOptions(max_new_tokens, **options), Timings(time.perf_counter())
        )
        yield from stream_text(self.prompts, (int(t[0]) for t in steps if int(t[0]) not in eos))

    def sampling_options(self, options: GenerateOptions) -> SamplingOptions:
        """Explicit options over the checkpoint's generation defaults from the manifest."""
        g = self.manifest.generation
        sampling = SamplingOptions(
            do_sample=g.do_sample if options.do_sample is None else options.do_sample,
            temperature=g.temperature if options.temperature is None else options.temperature,
            top_k=g.top_k if options.top_k is None else options.top_k,
            top_p=g.top_p if options.top_p is None else options.top_p,
        )
        if sampling.temperature <= 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise RlensError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        return sampling


def _rate(count: int, seconds: float) -> float:
    return count / seconds if count > 0 and seconds > 0 else 0.0
