"""The TRIM graph: pixel values + a CLIP-tokenized instruction -> the image tokens TRIM keeps, projected.

TRIM (Token Reduction using CLIP Metric) scores every visual token against the instruction in CLIP's
joint space and keeps the outliers; the rest are merged into one averaged token.

pixel_values [B, 3, H, W]
  -> CLIP vision tower at the LLaVA feature layer, CLS dropped         H [B, V, C]   (vision.py's blocks)
  -> z = visual_projection(post_layernorm(H))                          z [B, V, P]
clip_input_ids, clip_attention_mask [B, L]
  -> CLIP text tower (causal, padding masked), final LayerNorm,
     hidden state of the first end-of-text token, text_projection    t [B, P]
  -> s = cos(z, t) ("high", the paper) or z . t with p = softmax(-s) ("low", the public code)
  -> p = softmax(s) over the V tokens                                  p [B, V]
  -> keep p > Q3 + 1.5 (Q3 - Q1) ("iqr") or the top round(r V) ("ratio"); at least one token
  -> kept H in original order, then the mean of the unselected H       [B, V + 1, C]
  -> LLaVA projector, rows past the count zeroed                       image_features [B, V + 1, d]
                                                                       num_image_tokens [B]

The output has a fixed maximum of V + 1 rows plus a per-row count, so no shape depends on the data
(TensorRT can allocate it); a consumer takes the first ``num_image_tokens[b]`` rows of row b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rlens.errors import RlensError
from rlens.graphs.attention import mask_bias
from rlens.graphs.builder import FLOAT, INT64, GraphBuilder, Weights
from rlens.graphs.layers import activation, layer_norm, linear
from rlens.graphs.vision import VisionSpec, feature_states, multi_head_attention, projector

SELECTS = ("high", "low")
MODES = ("iqr", "ratio")


@dataclass(frozen=True)
class ClipTextSpec:
    """Geometry of the CLIP text tower and the joint embedding space."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    num_layers: int
    max_positions: int
    layer_norm_eps: float
    hidden_act: str
    eos_token_id: int
    """2 (legacy configs): pool at the argmax of the ids, as transformers does; else the first eos."""
    projection_dim: int


# -- the vision side ------------------------------------------------------------------------------
def tower_features(b: GraphBuilder, pixels: ir.Value, tower: Weights, spec: VisionSpec) -> ir.Value:
    """The hidden state at the LLaVA feature layer, CLS dropped as the strategy says: H [B, V, C].

    The same blocks ``build_vision`` runs; TRIM needs one feature layer, since its scoring space
    (``post_layernorm`` + ``visual_projection``) is the width of one hidden state.
    """
    if len(spec.feature_layers) != 1:
        raise RlensError(
            f"TRIM needs one vision feature layer (this LLaVA concatenates {len(spec.feature_layers)}): "
            "CLIP's visual projection scores one hidden state"
        )
    return feature_states(b, pixels, tower, spec)[0]  # [B, V, C]


# -- the text side --------------------------------------------------------------------------------
def clip_text_layer(
    b: GraphBuilder, x: ir.Value, mask: ir.Value, weights: Weights, i: int, spec: ClipTextSpec
) -> ir.Value:
    """Pre-norm CLIP block: ``x += attn(ln1(x) | mask); x += fc2(act(fc1(ln2(x))))``."""
    p = f"text_model.encoder.layers.{i}"
    with b.scope(f"layers.{i}"):
        h = layer_norm(b, x, weights, f"{p}.layer_norm1", spec.layer_norm_eps)
        x = b.op("Add", x, multi_head_attention(b, h, weights, f"{p}.self_attn", spec.num_heads, mask))
        h = layer_norm(b, x, weights, f"{p}.layer_norm2", spec.layer_norm_eps)
        with b.scope("mlp"):
            h = activation(b, linear(b, h, weights, f"{p}.mlp.fc1"), spec.hidden_act)
            h = linear(b, h, weights, f"{p}.mlp.fc2")
        return b.op("Add", x, h)


def clip_text_encoder(
    b: GraphBuilder, input_ids: ir.Value, attention_mask: ir.Value, weights: Weights, spec: ClipTextSpec
) -> ir.Value:
    """CLIPTextModel's ``pooler_output``: the final-LayerNormed state at the end-of-text token, [B, C].

    ``input_ids`` / ``attention_mask`` [B, L] (int64, L <= max_positions). The pooled position is
    transformers': with the legacy ``eos_token_id == 2`` the argmax of the ids (CLIP's eos is the
    highest id), else the first position holding ``eos_token_id``; both the first on ties (0 when
    a row has no eos). ``weights`` holds CLIPModel's tensors (``text_model.*``).
    """
    with b.scope("clip_text"):
        p = "text_model.embeddings"
        tokens = b.op("Gather", b.weight(weights.get(f"{p}.token_embedding.weight")), input_ids)  # [B, L, C]
        length = b.op("Squeeze", b.dim(input_ids, 1))
        positions = b.slice(b.weight(weights.get(f"{p}.position_embedding.weight")), 0, length, 0)  # [L, C]
        x = b.op("Add", tokens, positions)

        with b.scope("mask"):  # query q sees key k when k <= q and k is not padding
            pos = b.op("Range", b.const(0), length, b.const(1))  # [L]
            causal = b.op(
                "LessOrEqual", b.op("Unsqueeze", pos, b.const([0])), b.op("Unsqueeze", pos, b.const([1]))
            )  # [L, L]: [q, k]
            real = b.op("Cast", b.op("Unsqueeze", attention_mask, b.const([1])), to=ir.DataType.BOOL)
            visible = b.op("And", causal, real)  # [B, L, L]
            mask = mask_bias(b, b.op("Unsqueeze", visible, b.const([1])))  # [B, 1, L, L]

        for i in range(spec.num_layers):
            x = clip_text_layer(b, x, mask, weights, i, spec)
        x = layer_norm(b, x, weights, "text_model.final_layer_norm", spec.layer_norm_eps)  # [B, L, C]

        with b.scope("pool"):
            if spec.eos_token_id == 2:
                key = b.op("Cast", input_ids, to=FLOAT)  # ids < 2^24: exact as float
            else:
                key = b.op("Cast", b.op("Equal", input_ids, b.const(spec.eos_token_id)), to=FLOAT)
            eos = b.op("ArgMax", key, axis=1, keepdims=1)  # [B, 1]
            return b.op("GatherND", x, eos, batch_dims=1)  # [B, C]


# -- scoring and selection ------------------------------------------------------------------------
def trim_scores(
    b: GraphBuilder,
    features: ir.Value,
    text_pooled: ir.Value,
    weights: Weights,
    vision_eps: float,
    select: str,
) -> ir.Value:
    """Token importance ``p`` [B, V] from H [B, V, C] and the pooled text [B, Ct].

    ``z = visual_projection(post_layernorm(H))`` [B, V, P], ``t = text_projection(pooled)`` [B, P];
    "high": ``p = softmax(cos(z, t))``; "low": ``p = softmax(-(z . t))``.
    """
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, not {select!r}")
    with b.scope("scores"):
        z = layer_norm(b, features, weights, "vision_model.post_layernorm", vision_eps)
        z = b.op("MatMul", z, b.weight(weights.get("visual_projection.weight", transpose=True)))  # [B, V, P]
        t = b.op("MatMul", text_pooled, b.weight(weights.get("text_projection.weight", transpose=True)))
        if select == "high":
            z = b.op("Div", z, b.op("ReduceL2", z, b.const([-1]), keepdims=1))
            t = b.op("Div", t, b.op("ReduceL2", t, b.const([-1]), keepdims=1))
        s = b.op("Squeeze", b.op("MatMul", z, b.op("Unsqueeze", t, b.const([-1]))), b.const([-1]))  # [B, V]
        if select == "low":
            s = b.op("Neg", s)
        return b.op("Softmax", s, axis=-1)


def quartiles(b: GraphBuilder, p: ir.Value, n: int) -> tuple[ir.Value, ir.Value]:
    """Q1 and Q3 of each row of p [B, n], [B, 1] each, exactly as ``numpy.percentile(p, [25, 75])``.

    Sorted ascending with one TopK over all n; each quartile interpolates linearly between the
    order statistics at ``floor((n-1) q)`` and the next, with numpy's two-sided lerp
    (``a + (b-a) g`` for g < 1/2, ``b - (b-a)(1-g)`` otherwise). The positions and weights depend only
    on n, so they are constants.
    """
    with b.scope("quartiles"):
        ascending, _ = b.ops("TopK", p, b.const([n]), num_outputs=2, axis=-1, largest=0, sorted=1)  # [B, n]
        out = []
        for q in (0.25, 0.75):
            virtual = (n - 1) * q  # exact: q is a power-of-two fraction
            lo = math.floor(virtual)
            hi = min(lo + 1, n - 1)  # n == 1: both the only element
            gamma = virtual - lo
            a = b.slice(ascending, lo, lo + 1, 1)  # [B, 1]
            c = b.slice(ascending, hi, hi + 1, 1)
            diff = b.op("Sub", c, a)
            if gamma >= 0.5:
                out.append(b.op("Sub", c, b.op("Mul", diff, b.const(1 - gamma, np.float32))))
            else:
                out.append(b.op("Add", a, b.op("Mul", diff, b.const(gamma, np.float32))))
        return out[0], out[1]


def at_least_one(b: GraphBuilder, keep: ir.Value, p: ir.Value) -> ir.Value:
    """``keep`` [B, V] with the argmax of p (the first on ties) added to every row that keeps nothing."""
    with b.scope("at_least_one"):
        count = b.op("ReduceSum", b.op("Cast", keep, to=INT64), b.const([1]), keepdims=1)  # [B, 1]
        best = b.op("ArgMax", p, axis=1, keepdims=1)  # [B, 1]
        index = b.op("Range", b.const(0), b.op("Squeeze", b.dim(p, 1)), b.const(1))  # [V]
        is_best = b.op("Equal", b.op("Unsqueeze", index, b.const([0])), best)  # [B, V]
        return b.op("Or", keep, b.op("And", is_best, b.op("Equal", count, b.const(0))))


def iqr_select(b: GraphBuilder, p: ir.Value, n: int) -> ir.Value:
    """The upper outliers of p [B, n]: ``p > Q3 + 1.5 (Q3 - Q1)``, at least one per row; bool [B, n]."""
    with b.scope("iqr"):
        q1, q3 = quartiles(b, p, n)
        threshold = b.op("Add", q3, b.op("Mul", b.op("Sub", q3, q1), b.const(1.5, np.float32)))  # [B, 1]
        return at_least_one(b, b.op("Greater", p, threshold), p)


def ratio_keep_count(ratio: float, n: int) -> int:
    """``round(ratio * n)`` rounding halves up, at least 1 and at most n."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], not {ratio}")
    return min(n, max(1, math.floor(ratio * n + 0.5)))


def ratio_select(b: GraphBuilder, p: ir.Value, n: int, ratio: float) -> ir.Value:
    """The ``round(ratio * n)`` largest p of each row (the lower index first on ties); bool [B, n]."""
    k = ratio_keep_count(ratio, n)
    with b.scope("ratio"):
        _, top = b.ops("TopK", p, b.const([k]), num_outputs=2, axis=-1, largest=1, sorted=1)  # [B, k]
        zeros = b.op("ConstantOfShape", b.op("Shape", p), value=ir.tensor(np.zeros(1, np.float32)))
        ones = b.op("Expand", b.const(1.0, np.float32), b.op("Shape", top))
        marked = b.op("ScatterElements", zeros, top, ones, axis=1)  # [B, n]
        return b.op("Cast", marked, to=ir.DataType.BOOL)


def gather_selected(b: GraphBuilder, features: ir.Value, keep: ir.Value, n: int) -> tuple[ir.Value, ir.Value]:
    """The kept rows of H [B, n, C] in order, then the mean of the others: [B, n + 1, C] and the count [B].

    Row r < kept[b] is the r-th kept token; row kept[b] is the mean of the unselected tokens when
    there are any; later rows repeat that mean (the caller zeroes every row past the count).
    """
    with b.scope("gather"):
        kept = b.op("ReduceSum", b.op("Cast", keep, to=INT64), b.const([1]), keepdims=0)  # [B]
        others = b.op("Sub", b.const(n), kept)  # [B]
        # kept tokens first, by index: sort on key = index (kept) or n + index (not kept)
        index = b.const(np.arange(n, dtype=np.float32), np.float32)  # [n]
        key = b.op("Where", keep, index, b.op("Add", index, b.const(float(n), np.float32)))  # [B, n]
        _, order = b.ops("TopK", key, b.const([n]), num_outputs=2, axis=-1, largest=0, sorted=1)  # [B, n]
        row = b.const(np.arange(n + 1), np.int64)  # [n + 1]
        order = b.op("Concat", order, b.op("Unsqueeze", kept, b.const([1])), axis=1)  # [B, n + 1], pad
        source = b.op(
            "Where", b.op("Less", row, b.op("Unsqueeze", kept, b.const([1]))), order, b.const(n)
        )  # [B, n + 1]: a kept token, or row n (the merged one)

        unselected = b.op("Unsqueeze", b.op("Cast", b.op("Not", keep), to=FLOAT), b.const([1]))  # [B, 1, n]
        total = b.op("MatMul", unselected, features)  # [B, 1, C]
        divisor = b.op("Cast", b.op("Max", others, b.const(1)), to=FLOAT)
        merged = b.op("Div", total, b.op("Unsqueeze", divisor, b.const([1, 2])))  # [B, 1, C]
        extended = b.op("Concat", features, merged, axis=1)  # [B, n + 1, C]
        rows = b.op("GatherND", extended, b.op("Unsqueeze", source, b.const([-1])), batch_dims=1)
        count = b.op("Add", kept, b.op("Cast", b.op("Greater", others, b.const(0)), to=INT64))  # [B]
        return rows, count


# -- the graph ------------------------------------------------------------------------------------
def build_trim(
    vision: VisionSpec,
    tower: Weights,
    projector_weights: Weights,
    clip: ClipTextSpec,
    clip_weights: Weights,
    select: str = "high",
    mode: str = "iqr",
    ratio: float | None = None,
) -> ir.Model:
    """pixel_values, clip_input_ids, clip_attention_mask -> image_features [B, V+1, d], num_image_tokens [B].

    ``tower`` / ``projector_weights`` as for ``build_vision`` (LLaVA's tensors); ``clip_weights``
    holds CLIPModel's ``text_model.*``, ``text_projection.weight``, ``visual_projection.weight`` and
    ``vision_model.post_layernorm.*``. The CLIP vision tower must be LLaVA's (checked at export).
    """
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, not {select!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if (mode == "ratio") != (ratio is not None):
        raise ValueError("a ratio is given with mode='ratio' and only then")
    n = vision.num_visual_tokens
    b = GraphBuilder("trim")
    pixels = b.input("pixel_values", FLOAT, ["batch", 3, vision.image_size, vision.image_size])
    ids = b.input("clip_input_ids", INT64, ["batch", "clip_sequence"])
    mask = b.input("clip_attention_mask", INT64, ["batch", "clip_sequence"])

    with b.scope("vision"):
        features = tower_features(b, pixels, tower, vision)  # [B, V, C]
    text = clip_text_encoder(b, ids, mask, clip_weights, clip)  # [B, Ct]
    p = trim_scores(b, features, text, clip_weights, vision.layer_norm_eps, select)  # [B, V]
    keep = iqr_select(b, p, n) if mode == "iqr" else ratio_select(b, p, n, ratio)  # [B, V]
    rows, count = gather_selected(b, features, keep, n)  # [B, V + 1, C], [B]
    projected = projector(b, rows, projector_weights, vision)  # [B, V + 1, d]
    valid = b.op("Less", b.const(np.arange(n + 1), np.int64), b.op("Unsqueeze", count, b.const([1])))
    projected = b.op(
        "Where", b.op("Unsqueeze", valid, b.const([-1])), projected, b.const(0.0, np.float32)
    )  # rows past the count are zeros

    b.output(projected, "image_features", FLOAT, ["batch", n + 1, vision.text_hidden_size])
    b.output(count, "num_image_tokens", INT64, ["batch"])
    how = f"top {ratio_keep_count(ratio, n)}" if mode == "ratio" else "IQR outliers"
    return b.build(f"rlens trim: CLIP-scored ({select}) image tokens, {how} kept + 1 merged, projected")
