"""Loading a transformers LLaVA checkpoint and reading the geometry the graphs need.

Architectures differ only through this small table of facts read from the config (sliding
windows, head_dim, rope), never through flags threaded into the graph code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlens.errors import RlensError
from rlens.flops import Geometry
from rlens.graphs.builder import Weights
from rlens.graphs.decoder import DecoderSpec
from rlens.graphs.vision import VisionSpec

if TYPE_CHECKING:
    import torch

TEXT_BACKBONES = ("llama", "mistral", "qwen2")
VISION_TOWERS = ("clip_vision_model",)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rope types whose frequencies do not depend on the sequence length, so they fold into the graph."""


class TorchWeights(Weights):
    """A module's parameters by name, read without copying (fp32 CPU tensors share their memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    @classmethod
    def of(cls, module: torch.nn.Module, **extra: torch.Tensor) -> TorchWeights:
        return cls({**dict(module.named_parameters()), **extra})

    def names(self) -> set[str]:
        return set(self._tensors)

    def _load(self, name: str) -> np.ndarray:
        return self._tensors[name].detach().float().numpy()

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)


def read_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's config.json, refusing anything that is not a supported LLaVA."""
    if not model_dir.is_dir():
        raise RlensError(
            f"model directory '{model_dir}' does not exist; give a local LLaVA checkpoint "
            "directory (as save_pretrained writes it)"
        )
    path = model_dir / "config.json"
    if not path.is_file():
        raise RlensError(
            f"'{model_dir}' has no config.json; give a LLaVA checkpoint directory "
            "(as save_pretrained writes it)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RlensError(f"cannot read '{path}': {e}") from e
    model_type = config.get("model_type")
    if model_type != "llava":
        raise RlensError(
            f"'{model_dir}' holds a '{model_type}' model, not LLaVA; rlens exports "
            "LlavaForConditionalGeneration checkpoints"
        )
    text_type = config.get("text_config", {}).get("model_type", "llama")
    if text_type not in TEXT_BACKBONES:
        raise RlensError(
            f"text backbone '{text_type}' is not supported; supported: {', '.join(TEXT_BACKBONES)}"
        )
    vision_type = config.get("vision_config", {}).get("model_type", "clip_vision_model")
    if vision_type not in VISION_TOWERS:
        raise RlensError(f"vision tower '{vision_type}' is not supported; supported: CLIP ViT")
    return config


def load_model(model_dir: Path) -> Any:
    """``LlavaForConditionalGeneration`` in float32 on the CPU, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    read_config(model_dir)
    return load_pretrained(LlavaForConditionalGeneration, model_dir, "the LLaVA checkpoint")


def load_pretrained(cls: Any, model_dir: Path, what: str) -> Any:
    """``cls.from_pretrained(model_dir)`` in float32, in eval mode; a failure is one RlensError line."""
    import torch

    try:
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise RlensError(f"cannot load {what} from '{model_dir}': {str(e).splitlines()[0]}") from e
    return model.eval()


def load_processor(model_dir: Path) -> Any:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise RlensError(
            f"cannot load the processor of '{model_dir}' ({str(e).splitlines()[0]}); the checkpoint "
            "needs its tokenizer and image processor files, as processor.save_pretrained writes "
            "them"
        ) from e
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise RlensError(
            f"'{model_dir}' has no LLaVA processor (tokenizer + image processor); save one with "
            "processor.save_pretrained"
        )
    return processor


def decoder_spec(model: Any) -> DecoderSpec:
    """The decoder geometry of a loaded LLaVA, with RoPE frequencies taken from its own rotary module."""
    config = model.config.text_config
    rotary = model.model.language_model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise RlensError(
            f"rope type '{rope_type}' depends on the sequence length and cannot be baked into "
            f"a static graph; supported: {', '.join(STATIC_ROPE_TYPES)}"
        )
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral: one window for every layer when set; LLaMA: none
        windows = (window,) * config.num_hidden_layers
    else:  # Qwen2: the config says which layers slide
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    return DecoderSpec(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act=config.hidden_act,
        inv_freq=tuple(float(f) for f in rotary.inv_freq.float().tolist()),
        rope_attention_scaling=float(rotary.attention_scaling),
        sliding_windows=windows if any(w is not None for w in windows) else (),
    )


def vision_spec(model: Any) -> VisionSpec:
    """The vision tower and projector geometry; feature layers resolved to non-negative indices."""
    config = model.config
    vision = config.vision_config
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    num_hidden = vision.num_hidden_layers + 1  # hidden state 0 is the embedding output
    resolved = tuple(i % num_hidden for i in layers)
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise RlensError(f"vision_feature_select_strategy '{strategy}' is not supported (default, full)")
    return VisionSpec(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_size=vision.hidden_size,
        num_heads=vision.num_attention_heads,
        layer_norm_eps=vision.layer_norm_eps,
        hidden_act=vision.hidden_act,
        feature_layers=resolved,
        drop_cls=strategy == "default",
        projector_act=config.projector_hidden_act,
        text_hidden_size=config.text_config.hidden_size,
    )


def flop_geometry(model: Any) -> Geometry:
    """The sizes ``rlens.flops`` counts with."""
    dec, vis = decoder_spec(model), vision_spec(model)
    vision = model.config.vision_config
    return Geometry(
        hidden_size=dec.hidden_size,
        num_layers=dec.num_layers,
        num_heads=dec.num_heads,
        num_kv_heads=dec.num_kv_heads,
        head_dim=dec.head_dim,
        intermediate_size=dec.intermediate_size,
        vocab_size=dec.vocab_size,
        vision_hidden=vis.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_layers_run=max(vis.feature_layers),
        vision_tokens=vis.num_patches + 1,
        patch_pixels=3 * vis.patch_size**2,
        num_visual_tokens=vis.num_visual_tokens,
    )


def decoder_weights(model: Any) -> TorchWeights:
    return TorchWeights.of(model.model.language_model, **{"lm_head.weight": model.lm_head.weight})


def embedding_weights(model: Any) -> TorchWeights:
    return TorchWeights({"embed_tokens.weight": model.model.language_model.embed_tokens.weight})


def vision_weights(model: Any) -> tuple[TorchWeights, TorchWeights]:
    return TorchWeights.of(model.model.vision_tower), TorchWeights.of(model.model.multi_modal_projector)
