"""The vision graph: pixel values -> projected image features, one row per visual token.

pixel_values [B, 3, H, W]
  -> patch conv + class token + position embeddings -> pre-LayerNorm      (hidden state 0)
  -> CLIP encoder layers, as many as the selected feature layer needs     (hidden states 1..)
  -> feature layer(s), CLS dropped ("default" strategy) -> projector MLP
  -> image_features [B, V, d]
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from rlens.graphs.attention import attention
from rlens.graphs.builder import FLOAT, GraphBuilder, Weights
from rlens.graphs.layers import activation, layer_norm, linear


@dataclass(frozen=True)
class VisionSpec:
    """Geometry of a CLIP ViT tower plus the LLaVA projector."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]
    """Indices into the tower's hidden states (0 = embeddings), non-negative; concatenated when several."""
    drop_cls: bool
    projector_act: str
    text_hidden_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_visual_tokens(self) -> int:
        return self.num_patches + (0 if self.drop_cls else 1)


def patch_embeddings(b: GraphBuilder, pixels: ir.Value, weights: Weights, spec: VisionSpec) -> ir.Value:
    """Conv patches, the class token in front, learned position embeddings: [B, 1+N, C]."""
    with b.scope("embeddings"):
        p = "embeddings"
        patches = b.op(
            "Conv",
            pixels,
            b.weight(weights.get(f"{p}.patch_embedding.weight")),
            strides=[spec.patch_size, spec.patch_size],
        )  # [B, C, h, w]
        patches = b.op(
            "Transpose", b.op("Reshape", patches, b.const([0, spec.hidden_size, -1])), perm=[0, 2, 1]
        )  # [B, N, C]
        cls = b.op(
            "Reshape", b.weight(weights.get(f"{p}.class_embedding")), b.const([1, 1, spec.hidden_size])
        )
        cls = b.op("Expand", cls, b.shape_of(b.dim(pixels, 0), 1, spec.hidden_size))  # [B, 1, C]
        x = b.op("Concat", cls, patches, axis=1)
        return b.op("Add", x, b.weight(weights.get(f"{p}.position_embedding.weight")))


def multi_head_attention(
    b: GraphBuilder, x: ir.Value, weights: Weights, prefix: str, num_heads: int, mask: ir.Value | None = None
) -> ir.Value:
    """CLIP's attention block: q/k/v/out projections with biases, no rotary, optional additive mask.

    The vision tower attends bidirectionally (``mask`` None); the CLIP text tower passes its causal
    and padding mask ``[B, 1, L, L]``.
    """
    with b.scope("attn"):
        width = weights.get(f"{prefix}.q_proj.weight").shape[0]
        H, D = num_heads, width // num_heads

        def heads(name: str) -> ir.Value:  # [B, N, C] -> [B, H, N, D]
            y = linear(b, x, weights, f"{prefix}.{name}")
            return b.op("Transpose", b.op("Reshape", y, b.const([0, 0, H, D])), perm=[0, 2, 1, 3])

        out = attention(b, heads("q_proj"), heads("k_proj"), heads("v_proj"), mask, H, H, D)  # [B, H, N, D]
        out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.const([0, 0, H * D]))
        return linear(b, out, weights, f"{prefix}.out_proj")


def encoder_layer(b: GraphBuilder, x: ir.Value, weights: Weights, i: int, spec: VisionSpec) -> ir.Value:
    """Pre-norm CLIP block: ``x += attn(ln1(x)); x += fc2(act(fc1(ln2(x))))``."""
    p = f"encoder.layers.{i}"
    with b.scope(f"layers.{i}"):
        x = b.op(
            "Add",
            x,
            multi_head_attention(
                b,
                layer_norm(b, x, weights, f"{p}.layer_norm1", spec.layer_norm_eps),
                weights,
                f"{p}.self_attn",
                spec.num_heads,
            ),
        )
        h = layer_norm(b, x, weights, f"{p}.layer_norm2", spec.layer_norm_eps)
        with b.scope("mlp"):
            h = linear(
                b,
                activation(b, linear(b, h, weights, f"{p}.mlp.fc1"), spec.hidden_act),
                weights,
                f"{p}.mlp.fc2",
            )
        return b.op("Add", x, h)


def projector(b: GraphBuilder, x: ir.Value, weights: Weights, spec: VisionSpec) -> ir.Value:
    """LLaVA's two-layer MLP from the vision width to the LLM width."""
    with b.scope("projector"):
        return linear(
            b, activation(b, linear(b, x, weights, "linear_1"), spec.projector_act), weights, "linear_2"
        )


def feature_states(b: GraphBuilder, pixels: ir.Value, tower: Weights, spec: VisionSpec) -> list[ir.Value]:
    """The tower's hidden states at each selected feature layer, CLS dropped as the strategy says.

    Layers above the highest selected one are not built: their output is never used.
    """
    x = patch_embeddings(b, pixels, tower, spec)
    hidden = [layer_norm(b, x, tower, "pre_layrnorm", spec.layer_norm_eps)]  # hidden state 0
    for i in range(max(spec.feature_layers)):
        hidden.append(encoder_layer(b, hidden[-1], tower, i, spec))
    features = [hidden[i] for i in spec.feature_layers]
    return [b.slice(f, 1, 2**62, 1) for f in features] if spec.drop_cls else features  # [B, V, C] each


def build_vision(spec: VisionSpec, tower: Weights, projector_weights: Weights) -> ir.Model:
    """pixel_values [B, 3, H, W] -> image_features [B, V, d].

    ``tower`` holds the CLIP vision model's tensors under transformers' names
    (``encoder.layers.0.self_attn.q_proj.weight``), ``projector_weights`` the projector's
    (``linear_1.weight``).
    """
    b = GraphBuilder("vision")
    pixels = b.input("pixel_values", FLOAT, ["batch", 3, spec.image_size, spec.image_size])
    features = feature_states(b, pixels, tower, spec)
    selected = features[0] if len(features) == 1 else b.op("Concat", *features, axis=-1)
    b.output(
        projector(b, selected, projector_weights, spec),
        "image_features",
        FLOAT,
        ["batch", spec.num_visual_tokens, spec.text_hidden_size],
    )
    return b.build("rlens vision: CLIP tower at the feature layer + LLaVA projector")
