"""TRIM in PyTorch, with transformers' own towers: the oracle the TRIM graph is tested against.

Nothing here shares code with ``rlens.graphs.trim``: the vision features come from LLaVA's vision
tower (``output_hidden_states``) selected as ``LlavaModel.get_image_features`` selects them, the text
embedding from ``CLIPModel.get_text_features``, the quartiles from ``numpy.percentile``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def vision_features(llava_model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """H [B, V, C]: the hidden state at LLaVA's feature layer, CLS dropped by the "default" strategy."""
    config = llava_model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError("TRIM needs a single vision feature layer")
    out = llava_model.model.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[layer]
    return hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden


def text_embedding(clip_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """t [B, P]: ``text_projection`` of the CLIP text model's pooled output."""
    out = clip_model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if not hasattr(out, "pooler_output") else out.pooler_output


def importance(z: torch.Tensor, t: torch.Tensor, select: str) -> torch.Tensor:
    """p [V] from z [V, P] and t [P]: softmax(cos) ("high") or softmax(-dot) ("low")."""
    import torch

    if select == "high":
        return torch.softmax(torch.nn.functional.cosine_similarity(z, t[None, :], dim=-1), dim=-1)
    if select == "low":
        return torch.softmax(-(z @ t), dim=-1)
    raise ValueError(f"select must be 'high' or 'low', not {select!r}")


def selected_indices(p: np.ndarray, mode: str, ratio: float | None) -> list[int]:
    """Indices kept from p [V] (float32), ascending."""
    V = p.shape[0]
    if mode == "iqr":
        q1, q3 = np.percentile(p, [25, 75])
        keep = np.flatnonzero(p > q3 + 1.5 * (q3 - q1))
        if keep.size == 0:
            keep = np.array([int(np.argmax(p))])  # the first maximum
    elif mode == "ratio":
        assert ratio is not None
        k = min(V, max(1, math.floor(ratio * V + 0.5)))
        keep = np.argsort(-p, kind="stable")[:k]  # ties: the lower index first
    else:
        raise ValueError(f"mode must be 'iqr' or 'ratio', not {mode!r}")
    return sorted(int(i) for i in keep)


def trim_reference(
    llava_model: Any,
    clip_model: Any,
    pixel_values: torch.Tensor,
    clip_input_ids: torch.Tensor,
    clip_attention_mask: torch.Tensor,
    select: str = "high",
    mode: str = "iqr",
    ratio: float | None = None,
) -> list[tuple[list[int], torch.Tensor]]:
    """Per image: the kept token indices (original order) and its image features [n_b, d].

    The features are the kept tokens' H, then (when some token is not kept) the mean of the others,
    through the LLaVA projector.
    """
    import torch

    with torch.no_grad():
        H = vision_features(llava_model, pixel_values)  # [B, V, C]
        z = clip_model.visual_projection(clip_model.vision_model.post_layernorm(H))  # [B, V, P]
        t = text_embedding(clip_model, clip_input_ids, clip_attention_mask)  # [B, P]
        result = []
        for row in range(H.shape[0]):
            p = importance(z[row], t[row], select)
            keep = selected_indices(p.numpy(), mode, ratio)
            mask = torch.zeros(H.shape[1], dtype=torch.bool)
            mask[keep] = True
            rows = H[row][mask]
            if not mask.all():
                rows = torch.cat([rows, H[row][~mask].mean(dim=0, keepdim=True)])
            result.append((keep, llava_model.model.multi_modal_projector(rows)))
        return result
