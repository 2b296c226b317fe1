"""Rotary embeddings, attention masks and grouped-query attention.

Shapes in comments: B batch, S new tokens, P past tokens, T = P + S, H query heads, G kv heads,
R = H / G queries per kv head, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rlens.graphs.builder import FLOAT, GraphBuilder

MASKED = float(np.finfo(np.float32).min)
"""Score of a masked pair: finite, so a fully masked (padding) row softmaxes to a uniform row, not NaN."""


def rotary_tables(
    b: GraphBuilder, position_ids: ir.Value, inv_freq: np.ndarray, scaling: float
) -> tuple[ir.Value, ir.Value]:
    """``cos`` and ``sin`` of ``position * inv_freq`` for every head, ``[B, 1, S, D]``.

    ``inv_freq`` and ``scaling`` come from transformers' rope initialisation at export time, so
    every rope type it computes statically (default, linear, llama3, yarn, ...) is covered.
    """
    with b.scope("rotary"):
        pos = b.op("Cast", b.op("Unsqueeze", position_ids, b.const([-1])), to=FLOAT)  # [B, S, 1]
        freqs = b.op("Mul", pos, b.const(inv_freq, np.float32))  # [B, S, D/2]
        angles = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.const([1]))  # [B, 1, S, D]
        cos, sin = b.op("Cos", angles), b.op("Sin", angles)
        if scaling != 1.0:
            cos = b.op("Mul", cos, b.const(scaling, np.float32))
            sin = b.op("Mul", sin, b.const(scaling, np.float32))
        return cos, sin


def apply_rotary(b: GraphBuilder, x: ir.Value, cos: ir.Value, sin: ir.Value, head_dim: int) -> ir.Value:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``; x is [B, H, S, D]."""
    half = head_dim // 2
    x1 = b.op("Slice", x, b.const([0]), b.const([half]), b.const([-1]))
    x2 = b.op("Slice", x, b.const([half]), b.const([head_dim]), b.const([-1]))
    rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


@dataclass(frozen=True)
class Chunk:
    """Where the tokens of this decoder call sit, as 0-d int64 values computed once per graph.

    ``visual_start`` (a chunk column shared by the batch) and ``visual_lengths`` ([B]) describe the
    visual span when the decoder has reductions; row b's visual tokens are the columns
    ``visual_start .. visual_start + visual_lengths[b] - 1``, and the span is ``visual_max`` wide.
    ``visual_start`` and ``visual_max`` set sizes (the hollow and PAD-FFN slices): in the TensorRT
    track they come from an input's shape, so no input value decides a size.
    """

    attention_mask: ir.Value  # [B, T]
    token_index: ir.Value  # [B, T]: how many real tokens precede each column (padding not counted)
    past: ir.Value  # P
    new: ir.Value  # S
    total: ir.Value  # T
    visual_start: ir.Value | None = None
    visual_lengths: ir.Value | None = None
    visual_max: ir.Value | None = None
    visual_any: ir.Value | None = None
    """``min(visual_max, 1)``: 0 in a decode step, so the visual branches can size themselves to nothing."""


def chunk_of(
    b: GraphBuilder,
    embeds: ir.Value,
    attention_mask: ir.Value,
    visual_start: ir.Value | None = None,
    visual_lengths: ir.Value | None = None,
    visual_width: ir.Value | None = None,
) -> Chunk:
    with b.scope("chunk"):
        new = b.op("Squeeze", b.dim(embeds, 1))
        total = b.op("Squeeze", b.dim(attention_mask, 1))
        visual_max = visual_width
        if visual_lengths is not None and visual_max is None:
            visual_max = b.op("ReduceMax", visual_lengths, keepdims=0)
        token_index = b.op("CumSum", attention_mask, b.const(1), exclusive=1)
        return Chunk(
            attention_mask,
            token_index,
            b.op("Sub", total, new),
            new,
            total,
            visual_start,
            visual_lengths,
            visual_max,
            None if visual_max is None else b.op("Min", visual_max, b.const(1)),
        )


def visibility(
    b: GraphBuilder,
    chunk: Chunk,
    q_pos: ir.Value,
    k_pos: ir.Value,
    sliding_window: int | None,
    k_valid: ir.Value | None = None,
) -> ir.Value:
    """Which key each query may see, as a mask broadcastable to the scores ``[B, G, R, ..., Sq, Tk]``.

    ``q_pos`` and ``k_pos`` are cache indices shaped to broadcast against each other (``[..., Sq, 1]``
    and ``[..., 1, Tk]``). Query ``q`` sees key ``k`` when ``k <= q``, the key is not padding
    (``attention_mask[b, k] == 1``), with a sliding window ``W`` when the key is one of the ``W``
    latest real tokens (transformers' ``k > q - W``, counted without padding so that padding
    between a row's tokens does not shorten its window), and where ``k_valid`` is given, when it
    holds (keys outside the cache).
    """
    with b.scope("mask"):
        visible = b.op("LessOrEqual", k_pos, q_pos)
        last = b.op("Sub", chunk.total, b.const(1))
        k_col = b.op("Clip", k_pos, b.const(0), last)
        gathered = b.op("Gather", chunk.attention_mask, k_col, axis=1)
        visible = b.op("And", visible, b.op("Cast", gathered, to=ir.DataType.BOOL))  # [B, *k_pos.shape]
        if sliding_window is not None:  # counted in real tokens, so padding inside a row is not in it
            q_index = b.op("Gather", chunk.token_index, b.op("Clip", q_pos, b.const(0), last), axis=1)
            k_index = b.op("Gather", chunk.token_index, k_col, axis=1)
            window_start = b.op("Sub", q_index, b.const(sliding_window))
            visible = b.op("And", visible, b.op("Greater", k_index, window_start))
        if k_valid is not None:
            visible = b.op("And", visible, k_valid)
        return b.op("Unsqueeze", visible, b.const([1, 2]))  # [B, 1, 1, ...]


def mask_bias(b: GraphBuilder, visible: ir.Value) -> ir.Value:
    """A boolean mask as an additive one: 0 where visible, ``MASKED`` elsewhere.

    Made once on the small mask and added to the scores of every layer: a broadcast ``Add`` runs
    several times faster than a broadcast ``Where`` over ``[B, G, R, S, T]`` in ONNX Runtime, and
    ``score + MASKED`` rounds to ``MASKED`` for any score a model produces.
    """
    return b.op("Where", visible, b.const(0.0, np.float32), b.const(MASKED, np.float32))


def causal_mask(b: GraphBuilder, chunk: Chunk, sliding_window: int | None = None) -> ir.Value:
    """The ordinary additive mask of a chunk: ``[B, 1, S, T]``, query ``i`` at cache index ``P + i``."""
    one = b.const(1)
    q_pos = b.op("Unsqueeze", b.op("Range", chunk.past, chunk.total, one), b.const([-1]))  # [S, 1]
    k_pos = b.op("Unsqueeze", b.op("Range", b.const(0), chunk.total, one), b.const([0]))  # [1, T]
    return b.op("Squeeze", mask_bias(b, visibility(b, chunk, q_pos, k_pos, sliding_window)), b.const([2]))


def attention(
    b: GraphBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    mask: ir.Value | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> ir.Value:
    """``softmax(q k^T / sqrt(D) | mask) v`` with grouped kv heads; q [B, H, S, D], k/v [B, G, T, D].

    ``mask`` (``[B, 1, S, T]``) is additive: 0 where visible, ``MASKED`` elsewhere (see
    ``mask_bias``); None: every query sees every key.
    The R query heads of a kv head are stacked along the sequence, ``[B, G, R*S, D]``, so every
    product is a plain 4-D batched MatMul (ONNX Runtime's fast path) and the kv heads are never
    repeated in memory; the mask is tiled R times to match.
    """
    with b.scope("sdpa"):
        group = num_heads // num_kv_heads
        q = b.op("Mul", q, b.const(head_dim**-0.5, np.float32))
        if group > 1:
            q = b.op("Reshape", q, b.const([0, num_kv_heads, -1, head_dim]))  # [B, G, R*S, D]
        scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))  # [B, G, R*S, T]
        if mask is not None:
            if group > 1:
                mask = b.op("Tile", mask, b.const([1, 1, group, 1]))  # [B, 1, R*S, T]
            scores = b.op("Add", scores, mask)
        probs = b.op("Softmax", scores, axis=-1)
        out = b.op("MatMul", probs, v)  # [B, G, R*S, D]
        if group > 1:
            out = b.op("Reshape", out, b.const([0, num_heads, -1, head_dim]))  # [B, H, S, D]
        return out


def hollow_attention(
    b: GraphBuilder,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    chunk: Chunk,
    heads: tuple[int, int, int],
    window: int,
    block: int,
    max_visual: int,
    sliding_window: int | None = None,
) -> ir.Value:
    """Hollow Attention (RedundancyLens): visual queries see the prefix and a causal window of visual keys.

        columns of the chunk:  [ text prefix | visual span (V) | text suffix ]
        text queries   ──> ordinary attention over every key (a dense causal pass)
        visual queries ──> in blocks of ``block``; each block scores
                             the prefix keys [0, P + vs)                     (all of them)
                           + its own block and the ``nw`` blocks before it   (k > q - window)
                           one softmax over both; the visual->visual pairs outside the window
                           are never computed
        outputs reassembled in column order -> [B, H, S, D]

    q [B, H, S, D], k/v [B, G, T, D] (cache included). ``max_visual`` (the most visual tokens a
    chunk can hold) caps how many blocks back a window reaches. A chunk without visual tokens
    (a decode step) takes only the text pass.
    """
    H, G, D = heads
    R = H // G
    assert chunk.visual_start is not None and chunk.visual_max is not None, (
        "hollow attention needs a visual span"
    )
    assert chunk.visual_any is not None
    vs, V, P, S = chunk.visual_start, chunk.visual_max, chunk.past, chunk.new
    nw = max(0, min(-(-(window - 1) // block), -(-max_visual // block) - 1))  # blocks back the window reaches
    width = (nw + 1) * block
    one = b.const(1)
    with b.scope("hollow"):
        vend = b.op("Add", vs, V)
        # -- text queries: every key, causal -----------------------------------------------------
        q_text = b.op("Concat", b.slice(q, 0, vs, 2), b.slice(q, vend, S, 2), axis=2)
        text_pos = b.op(
            "Concat",
            b.op("Range", P, b.op("Add", P, vs), one),
            b.op("Range", b.op("Add", P, vend), chunk.total, one),
            axis=0,
        )
        all_keys = b.op("Unsqueeze", b.op("Range", b.const(0), chunk.total, one), b.const([0]))
        text_mask = mask_bias(
            b, visibility(b, chunk, b.op("Unsqueeze", text_pos, b.const([-1])), all_keys, sliding_window)
        )
        text_mask = b.op("Squeeze", text_mask, b.const([2]))  # [B, 1, S - V, T]
        out_text = attention(b, q_text, k, v, text_mask, H, G, D)  # [B, H, S - V, D]

        # -- visual queries: blocks of `block`, padded up to a whole number of blocks ------------
        blocks = b.op("Div", b.op("Add", V, b.const(block - 1)), b.const(block))  # nb = ceil(V / block)
        padded = b.op("Mul", blocks, b.const(block))
        pad = b.op("Unsqueeze", b.op("Sub", padded, V), b.const([0]))
        nb = b.op("Unsqueeze", blocks, b.const([0]))

        def visual_columns(x: ir.Value, start: ir.Value) -> ir.Value:  # [B, n, cols, D] -> padded to nb*block
            cols = b.slice(x, start, b.op("Add", start, V), 2)
            return b.op("Pad", cols, b.op("Concat", b.const([0, 0, 0, 0, 0, 0]), pad, b.const([0]), axis=0))

        q_vis = b.op("Mul", visual_columns(q, vs), b.const(D**-0.5, np.float32))
        batch = b.dim(q, 0)
        # allowzero: nb is 0 in a decode step, and must not mean "copy this axis"
        q_blocks = b.op(
            "Reshape", q_vis, b.shape_of(batch, G, R, nb, block, D), allowzero=1
        )  # [B,G,R,nb,blk,D]
        offsets = b.op("Reshape", b.op("Range", b.const(0), padded, one), b.shape_of(nb, block), allowzero=1)
        q_idx = b.op("Unsqueeze", offsets, b.const([-1]))  # [nb, blk, 1] visual offset of each query
        vis_start = b.op("Add", P, vs)  # cache index of the first visual token
        q_pos = b.op("Add", q_idx, vis_start)

        # prefix keys [0, P + vs): every visual query may see them (causal, not padding); none in a
        # decode step, which would otherwise copy its whole KV cache here for no query
        pre_end = b.op("Mul", vis_start, chunk.visual_any)
        k_pre = b.slice(k, 0, pre_end, 2)
        v_pre = b.slice(v, 0, pre_end, 2)
        pre_pos = b.op("Unsqueeze", b.op("Range", b.const(0), pre_end, one), b.const([0, 1]))  # [1, 1, Pv]
        # scored as [B, G, R, nb*blk, Pv] so no zero-sized axis is ever broadcast (nb is 0 in decode)
        padded_1d = b.op("Unsqueeze", padded, b.const([0]))
        q_flat = b.op("Reshape", q_vis, b.shape_of(batch, G, R, padded_1d, D), allowzero=1)
        scores_pre = b.op(
            "MatMul", q_flat, b.op("Transpose", b.op("Unsqueeze", k_pre, b.const([2])), perm=[0, 1, 2, 4, 3])
        )  # [B, G, R, nb*blk, Pv]
        pre_width = b.op("Unsqueeze", pre_end, b.const([0]))
        scores_pre = b.op("Reshape", scores_pre, b.shape_of(batch, G, R, nb, block, pre_width), allowzero=1)
        pre_mask = mask_bias(b, visibility(b, chunk, q_pos, pre_pos, sliding_window))

        # window keys: the block grid shifted by 0..nw blocks; block j of the queries meets block
        # j - s of the keys in shift s, so each shift is one batched [blk x blk] product per block
        def shifted_grids(x: ir.Value) -> list[ir.Value]:  # [B, G, T, D] -> nw+1 x [B, G, 1, nb, blk, D]
            grid = b.op(
                "Reshape", visual_columns(x, vis_start), b.shape_of(batch, G, nb, block, D), allowzero=1
            )
            grid = b.op("Pad", grid, b.const([0, 0, nw, 0, 0, 0, 0, 0, 0, 0]))  # nw empty blocks in front
            return [
                b.op(
                    "Unsqueeze", b.slice(grid, nw - s, b.op("Add", blocks, b.const(nw - s)), 2), b.const([2])
                )
                for s in range(nw, -1, -1)
            ]

        k_grids, v_grids = shifted_grids(k), shifted_grids(v)
        first_key = b.op("Mul", b.op("Range", b.const(0), blocks, one), b.const(block))  # [nb]
        k_idx = b.op(
            "Add", b.op("Unsqueeze", first_key, b.const([-1])), b.const(np.arange(width) - nw * block)
        )  # [nb, width]
        k_idx = b.op("Unsqueeze", k_idx, b.const([1]))  # [nb, 1, width]
        in_window = b.op(
            "And",
            b.op("Greater", k_idx, b.op("Sub", q_idx, b.const(window))),
            b.op("And", b.op("GreaterOrEqual", k_idx, b.const(0)), b.op("Less", k_idx, V)),
        )
        win_mask = mask_bias(
            b, visibility(b, chunk, q_pos, b.op("Add", k_idx, vis_start), sliding_window, in_window)
        )
        scores_win = [
            b.op("MatMul", q_blocks, b.op("Transpose", kg, perm=[0, 1, 2, 3, 5, 4])) for kg in k_grids
        ]  # each [B, G, R, nb, blk, blk]

        # one softmax over prefix and window keys, then the weighted sums of each part
        scores = b.op(
            "Concat",
            b.op("Add", scores_pre, pre_mask),
            b.op(
                "Add",
                b.op("Concat", *scores_win, axis=-1) if len(scores_win) > 1 else scores_win[0],
                win_mask,
            ),
            axis=-1,
        )
        probs = b.op("Softmax", scores, axis=-1)
        sizes = b.op(
            "Concat", b.op("Unsqueeze", pre_end, b.const([0])), b.const([block] * len(v_grids)), axis=0
        )
        probs_pre, *probs_win = b.ops("Split", probs, sizes, num_outputs=1 + len(v_grids), axis=-1)
        probs_pre = b.op("Reshape", probs_pre, b.shape_of(batch, G, R, padded_1d, pre_width), allowzero=1)
        out_pre = b.op("MatMul", probs_pre, b.op("Unsqueeze", v_pre, b.const([2])))  # [B, G, R, nb*blk, D]
        out_win = [b.op("MatMul", p, vg) for p, vg in zip(probs_win, v_grids, strict=True)]
        out_win = out_win[0] if len(out_win) == 1 else b.op("Sum", *out_win)  # [B, G, R, nb, blk, D]
        out_win = b.op("Reshape", out_win, b.shape_of(batch, G, R, padded_1d, D), allowzero=1)
        out_vis = b.op(
            "Reshape", b.op("Add", out_pre, out_win), b.shape_of(batch, H, padded_1d, D), allowzero=1
        )
        out_vis = b.slice(out_vis, 0, V, 2)  # [B, H, V, D]

        return b.op(
            "Concat",
            b.slice(out_text, 0, vs, 2),
            out_vis,
            b.slice(out_text, vs, b.op("Sub", S, V), 2),
            axis=2,
        )
