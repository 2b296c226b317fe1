"""The CLIP model TRIM scores with: loading it, its text geometry, its weights, and the tower check.

TRIM scores LLaVA's visual tokens in CLIP's joint space, so it needs the full ``CLIPModel`` whose
vision tower LLaVA was built on (for LLaVA-1.5: ``openai/clip-vit-large-patch14-336``): the text
tower and both projections. The vision tower itself is LLaVA's; :func:`check_same_vision_tower`
makes sure the CLIP given is the right one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlens.errors import RlensError
from rlens.exporter.checkpoint import TorchWeights, load_pretrained, vision_spec
from rlens.graphs.trim import ClipTextSpec

TOWER_RTOL = 2**-7
"""Relative tolerance of the tower check: a float16 or bfloat16 copy of the same weights passes."""
TOWER_ATOL = 1e-6


def load_clip(model_dir: Path) -> Any:
    """``CLIPModel`` in float32 on the CPU, in eval mode."""
    from transformers import CLIPModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RlensError(
            f"'{model_dir}' is not a CLIP checkpoint directory (no config.json); give the CLIPModel "
            "the LLaVA vision tower comes from, as save_pretrained writes it"
        )
    return load_pretrained(CLIPModel, model_dir, "a CLIPModel")


def clip_text_spec(clip_model: Any) -> ClipTextSpec:
    text = clip_model.config.text_config
    return ClipTextSpec(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_heads=text.num_attention_heads,
        num_layers=text.num_hidden_layers,
        max_positions=text.max_position_embeddings,
        layer_norm_eps=text.layer_norm_eps,
        hidden_act=text.hidden_act,
        eos_token_id=int(clip_model.text_model.eos_token_id),  # what CLIPTextModel.forward pools with
        projection_dim=clip_model.config.projection_dim,
    )


def clip_weights(clip_model: Any) -> TorchWeights:
    """What the TRIM graph reads from CLIP, under CLIPModel's own names.

    ``text_model.*`` (the text tower), ``text_projection.weight``, ``visual_projection.weight`` and
    ``vision_model.post_layernorm.{weight,bias}`` (the scoring space of the visual tokens).
    """
    tensors = {f"text_model.{k}": v for k, v in clip_model.text_model.named_parameters()}
    tensors["text_projection.weight"] = clip_model.text_projection.weight
    tensors["visual_projection.weight"] = clip_model.visual_projection.weight
    post = clip_model.vision_model.post_layernorm
    tensors["vision_model.post_layernorm.weight"] = post.weight
    tensors["vision_model.post_layernorm.bias"] = post.bias
    return TorchWeights(tensors)


def used_tower_names(llava_model: Any) -> list[str]:
    """The vision-tower tensors LLaVA's image features depend on: embeddings, pre-LN, the layers run."""
    spec = vision_spec(llava_model)
    layers = max(spec.feature_layers)
    names = []
    for name, _ in llava_model.model.vision_tower.named_parameters():
        if name.startswith(("embeddings.", "pre_layrnorm.")) or any(
            name.startswith(f"encoder.layers.{i}.") for i in range(layers)
        ):
            names.append(name)
    return names


def check_same_vision_tower(llava_model: Any, clip_model: Any) -> None:
    """Raise :class:`RlensError` naming the first tower tensor where the CLIP differs from the LLaVA.

    Every tensor the LLaVA features use is compared, within float16/bfloat16 rounding (checkpoints
    are often stored in half precision).
    """
    import torch

    ours = dict(llava_model.model.vision_tower.named_parameters())
    theirs = dict(clip_model.vision_model.named_parameters())
    for name in used_tower_names(llava_model):
        a, c = ours[name].detach().float(), theirs.get(name)
        if (
            c is None
            or c.shape != a.shape
            or not torch.allclose(a, c.detach().float(), rtol=TOWER_RTOL, atol=TOWER_ATOL)
        ):
            raise RlensError(
                f"the CLIP model's vision tower differs from the LLaVA one ({name}); "
                "TRIM needs the CLIP the LLaVA was built on"
            )
