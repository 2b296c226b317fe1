"""From a user's question to the token ids the embedding graph reads, and from ids back to text.

Uses the ``tokenizers`` library on the ``tokenizer.json`` copied into the artifact, and the chat
layout the exporter rendered into the manifest, so no transformers and no template engine run here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from rlens.errors import RlensError
from rlens.manifest import Manifest

log = logging.getLogger("rlens")


class PromptEncoder:
    """Lays out prompts (chat template, one image token per visual position) and decodes answers."""

    def __init__(self, artifact_dir: Path, manifest: Manifest) -> None:
        path = artifact_dir / manifest.tokenizer.file
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise RlensError(f"cannot read tokenizer '{path}': {e}; re-export the model") from e
        self.layout = manifest.prompt
        self.image_token_id = manifest.model.image_token_id

    def text(self, question: str, has_image: bool) -> str:
        """The prompt as text: the chat layout around ``question``, with the image token placed once."""
        layout = self.layout
        placed = question.count(layout.image_token)
        if not has_image:
            if placed:
                raise RlensError(
                    f"the prompt contains {layout.image_token} but no image was given; "
                    "pass --image or remove the placeholder"
                )
            return layout.text_prefix + question + layout.text_suffix
        if placed > 1:
            raise RlensError(
                f"the prompt places {layout.image_token} {placed} times; one image per prompt is supported"
            )
        if placed == 1:
            return layout.text_prefix + question + layout.text_suffix
        return layout.image_prefix + question + layout.image_suffix

    def encode(self, question: str, num_visual_tokens: int | None) -> list[int]:
        """Token ids of the prompt; the image token is repeated once per visual token."""
        text = self.text(question, num_visual_tokens is not None)
        ids = self.tokenizer.encode(text, add_special_tokens=self.layout.add_special_tokens).ids
        if num_visual_tokens is None:
            return ids
        if ids.count(self.image_token_id) != 1:
            raise RlensError(
                f"the prompt tokenized to {ids.count(self.image_token_id)} image tokens, "
                "expected 1; check the prompt's image placeholder"
            )
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * num_visual_tokens + ids[at + 1 :]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class InstructionEncoder:
    """The user's question as CLIP's text tower reads it: no chat template, no image placeholder.

    Truncated to CLIP's context (77 tokens, end-of-text kept last) with a warning, padded per batch.
    """

    def __init__(self, artifact_dir: Path, manifest: Manifest) -> None:
        assert manifest.trim is not None
        path = artifact_dir / manifest.trim.clip_tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise RlensError(f"cannot read CLIP tokenizer '{path}': {e}; re-export the model") from e
        self.max_length = manifest.trim.clip_max_length
        self.image_token = manifest.prompt.image_token
        self.tokenizer.enable_truncation(self.max_length)
        pad = manifest.trim.clip_pad_token_id
        self.tokenizer.enable_padding(pad_id=pad, pad_token=self.tokenizer.id_to_token(pad) or "")

    def encode(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """CLIP token ids and attention mask [B, L] (int64) of the questions."""
        texts = [" ".join(q.replace(self.image_token, " ").split()) for q in questions]
        encodings = self.tokenizer.encode_batch(texts)
        for text, encoding in zip(texts, encodings, strict=True):
            if encoding.overflowing:
                log.warning(
                    "the instruction is longer than CLIP's %d tokens; TRIM scores its first %d: %.40s...",
                    self.max_length,
                    self.max_length,
                    text,
                )
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask


def stream_text(encoder: PromptEncoder, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece is held back while it ends inside a UTF-8 character."""
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(token)
        text = encoder.decode(ids)
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            continue
        yield text[len(emitted) :]
        emitted = text
    text = encoder.decode(ids)
    if len(text) > len(emitted):  # what was held back when the answer ended inside a character
        yield text[len(emitted) :]
