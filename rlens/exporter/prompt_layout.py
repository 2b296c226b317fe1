"""Rendering the checkpoint's chat template into the fixed prompt layout of the manifest.

The runtime has no template engine, so the exporter renders the template once around a
placeholder and records what comes before and after the user's text, with and without an image.
"""

from __future__ import annotations

from typing import Any

from rlens.errors import RlensError
from rlens.manifest import PromptInfo

PLACEHOLDER = "RLENSPROMPTPLACEHOLDER"


def _split(rendered: str) -> tuple[str, str]:
    if rendered.count(PLACEHOLDER) != 1:
        raise RlensError(
            "the checkpoint's chat template does not pass the user's text through unchanged; "
            "rlens cannot lay out prompts for it"
        )
    prefix, suffix = rendered.split(PLACEHOLDER)
    return prefix, suffix


def prompt_layout(processor: Any) -> PromptInfo:
    """``PromptInfo`` for a LLaVA processor: its chat template if it has one, else ``<image>\\n{text}``."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", None) or "<image>"
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        return PromptInfo(
            image_token=image_token,
            image_prefix=f"{image_token}\n",
            image_suffix="",
            text_prefix="",
            text_suffix="",
            add_special_tokens=True,
            chat_template=False,
        )

    def render(content: list[dict[str, str]]) -> tuple[str, str]:
        messages = [{"role": "user", "content": content}]
        return _split(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    image_prefix, image_suffix = render([{"type": "image"}, {"type": "text", "text": PLACEHOLDER}])
    text_prefix, text_suffix = render([{"type": "text", "text": PLACEHOLDER}])
    bos = tokenizer.bos_token
    # A template that writes the BOS token itself must not get a second one from the tokenizer.
    add_special = not (bos and image_prefix.startswith(bos))
    return PromptInfo(
        image_token=image_token,
        image_prefix=image_prefix,
        image_suffix=image_suffix,
        text_prefix=text_prefix,
        text_suffix=text_suffix,
        add_special_tokens=add_special,
        chat_template=True,
    )
