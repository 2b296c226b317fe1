"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

The order of the filters follows transformers' ``generate`` (temperature, then top-k, then
top-p), so the same settings mean the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1 keeps all."""


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def filter_logits(logits: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """Temperature, top-k and top-p applied to ``logits`` [B, vocab]; removed entries become -inf."""
    logits = logits / max(options.temperature, 1e-6)
    if 0 < options.top_k < logits.shape[-1]:
        kth = np.partition(logits, -options.top_k, axis=-1)[:, -options.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if options.top_p < 1.0:
        order = np.argsort(-logits, axis=-1)
        sorted_probs = np.take_along_axis(softmax(logits), order, axis=-1)
        # a token is dropped when the tokens before it already reach top_p; the first is always kept
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= options.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def sample(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """The next token id per row of ``logits`` [B, vocab] -> [B] int64."""
    if not options.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    probs = softmax(filter_logits(logits.astype(np.float64), options))
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
