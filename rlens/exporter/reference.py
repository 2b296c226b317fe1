"""The PyTorch reference of Hollow Attention and PAD-FFN on a transformers LLaVA model.

Two jobs: it is the oracle the ONNX decoder graphs are compared against, and it is the engine of the
layer ranking (``layer_ranking.py``). Both need the reductions applied to the checkpoint's own weights
without touching transformers, so this module runs its own decoder-layer loop over the model's own
submodules (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``rotary_emb``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, ``mlp.act_fn``, ``norm``, ``lm_head``). The
llama, mistral and qwen2 backbones differ only in biases (carried by the ``Linear`` modules) and in
which layers slide (:func:`sliding_windows`).

Attention is dense and masked, in float32: clarity over speed. The mask is built in one place,
:func:`visibility`, which is the definition the graphs must match:

- base: query column q sees key column k iff ``k <= q``, ``attention_mask[b, k] == 1`` and, on a
  sliding layer of window W, k is one of the W latest real tokens up to q: ``t[q] - W < t[k]`` with
  ``t = cumsum(mask) - mask`` the count of real tokens before a column. That is transformers'
  ``q - W < k`` whenever a row has no padding between its tokens, and keeps padding inside a row
  (the runtime pads inside the visual span) from shortening the window, as the graphs do;
- hollow layer of window R: a visual query additionally sees a visual key only if ``q - R < k``.

Masked scores are set to float32's minimum rather than ``-inf`` so a fully masked (padding) query row
stays finite; what such a row computes is garbage that nothing reads.

Row b's visual tokens are the columns ``visual_start .. visual_start + visual_lengths[b] - 1``; the
columns after them up to ``visual_start + max(visual_lengths) - 1`` must be padding in that row (a
row without an image is all padding there: the runtime's ``batch_layout``). Every non-visual column
gets ordinary attention and the full FFN; its ``attention_mask`` decides whether it is a real token.

Definitions: ../shared/METHODS.md ("Hollow Attention", "PAD-FFN").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlens.errors import RlensError
from rlens.reductions import Reductions, ffn_keep_channels, probe_indices

Rope = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin), each [B, S, head_dim], as the model's ``rotary_emb`` returns them."""


@dataclass
class ReferenceInputs:
    """What one forward needs; build it with :func:`prepare_inputs` (or by hand, as the runtime does).

    ``inputs_embeds`` [B, S, d] float32, ``attention_mask`` [B, S] (1 real, 0 padding, anywhere in the
    row), ``position_ids`` [B, S] (the runtime's ``max(cumsum(mask) - 1, 0)``, see
    :func:`runtime_position_ids`), and the visual span: the same start column for every row and one
    length per row.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    visual_start: int
    visual_lengths: list[int]

    def __post_init__(self) -> None:
        batch, seq, _ = self.inputs_embeds.shape
        assert self.attention_mask.shape == (batch, seq), (self.attention_mask.shape, (batch, seq))
        assert self.position_ids.shape == (batch, seq), (self.position_ids.shape, (batch, seq))
        assert len(self.visual_lengths) == batch, (self.visual_lengths, batch)
        longest = max(self.visual_lengths, default=0)
        assert min(self.visual_lengths, default=0) >= 0, self.visual_lengths
        assert longest == 0 or 0 <= self.visual_start <= seq - longest, (self.visual_start, longest, seq)
        span = self.attention_mask[:, self.visual_start : self.visual_start + longest].bool()
        shorter = span & ~self.visual_mask()[:, self.visual_start : self.visual_start + longest]
        if shorter.any():
            raise ValueError(
                f"row {int(shorter.any(1).nonzero()[0])} has real tokens inside the visual span after its "
                "own visual tokens; those columns must be padding (attention_mask 0), as the graphs assume"
            )

    def visual_mask(self) -> torch.Tensor:
        """[B, S] bool: True on row b's visual columns ``visual_start .. visual_start + V_b - 1``."""
        columns = torch.arange(self.inputs_embeds.shape[1])
        lengths = torch.tensor(self.visual_lengths, dtype=torch.long)[:, None]
        return (columns >= self.visual_start) & (columns < self.visual_start + lengths)

    def append(self, embeds: torch.Tensor) -> ReferenceInputs:
        """These inputs followed by real (unpadded) tokens ``embeds`` [B, n, d]: one greedy step's growth."""
        new = torch.ones(embeds.shape[:2], dtype=self.attention_mask.dtype)
        mask = torch.cat([self.attention_mask, new], dim=1)
        return ReferenceInputs(
            inputs_embeds=torch.cat([self.inputs_embeds, embeds.to(self.inputs_embeds.dtype)], dim=1),
            attention_mask=mask,
            position_ids=runtime_position_ids(mask),
            visual_start=self.visual_start,
            visual_lengths=list(self.visual_lengths),
        )


def runtime_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``max(cumsum(mask) - 1, 0)``: real tokens count 0, 1, 2, ... whatever padding sits between them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prepare_inputs(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> ReferenceInputs:
    """Embeddings with the image features scattered in, as transformers does, plus the visual span.

    ``input_ids`` [B, S] hold the image token once per visual position (as ``LlavaProcessor`` lays
    them out). The span is read off where the image tokens are: each row's must be contiguous and
    start at the same column (the reductions take one start column for the whole batch); a row
    without image tokens has length 0. Position ids follow the runtime's rule, which for left padding
    gives the real tokens the same positions as transformers' ``generate``.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    image_token = model.config.image_token_id
    is_image = input_ids == image_token
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(input_ids).float()
        if pixel_values is not None:
            features = model.model.get_image_features(pixel_values=pixel_values).pooler_output
            features = torch.cat(list(features), dim=0).to(embeds.dtype)  # [num_images * V, d]
            if features.shape[0] != int(is_image.sum()):
                raise ValueError(
                    f"input_ids hold {int(is_image.sum())} image tokens but the images give "
                    f"{features.shape[0]} visual features; repeat the image token once per visual position"
                )
            embeds = embeds.masked_scatter(is_image[..., None], features)
        elif is_image.any():
            raise ValueError("input_ids hold image tokens but pixel_values is None")
    visual_start, visual_lengths = _visual_span(is_image)
    return ReferenceInputs(
        inputs_embeds=embeds,
        attention_mask=attention_mask.long(),
        position_ids=runtime_position_ids(attention_mask),
        visual_start=visual_start,
        visual_lengths=visual_lengths,
    )


def _visual_span(is_image: torch.Tensor) -> tuple[int, list[int]]:
    """(start column shared by all rows, length per row) of the image tokens in [B, S] ``is_image``."""
    starts, lengths = set(), []
    for row, flags in enumerate(is_image):
        columns = flags.nonzero().flatten().tolist()
        if columns and columns != list(range(columns[0], columns[0] + len(columns))):
            raise ValueError(f"row {row}: the image tokens are not contiguous (one image per row)")
        if columns:
            starts.add(columns[0])
        lengths.append(len(columns))
    if len(starts) > 1:
        raise ValueError(
            f"the rows' image tokens start at different columns {sorted(starts)}; the reductions take one "
            "visual start column per batch, so pad the rows so their images line up (or run them one by one)"
        )
    return (starts.pop() if starts else 0), lengths


def sliding_windows(config: Any) -> list[int | None]:
    """The sliding window of each decoder layer (None: full causal attention).

    Mistral slides on every layer when ``sliding_window`` is set; Qwen2 names the sliding layers in
    ``layer_types``; LLaMA has no window.
    """
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    if config.model_type == "qwen2":
        return [window if kind == "sliding_attention" else None for kind in config.layer_types]
    return [window] * layers


def visibility(
    attention_mask: torch.Tensor,
    visual: torch.Tensor,
    sliding_window: int | None,
    hollow_window: int | None,
) -> torch.Tensor:
    """[B, S, S] bool: query column q (dim 1) sees key column k (dim 2). The mask the graphs must match.

    See the module docstring for the rules (causal, padding, sliding window in real tokens, hollow).

    ``visual`` [B, S] marks each row's visual columns; ``hollow_window`` None means a non-hollow layer.
    """
    seq = attention_mask.shape[1]
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    visible = (k <= q)[None] & attention_mask.bool()[:, None, :]  # causal, real keys only
    if sliding_window is not None:  # counted in real tokens: padding inside a row is not in the window
        index = attention_mask.long().cumsum(-1) - attention_mask.long()  # [B, S] real tokens before
        visible = visible & (index[:, None, :] > index[:, :, None] - sliding_window)
    if hollow_window is not None:
        visual_pair = visual[:, :, None] & visual[:, None, :]  # visual query, visual key
        visible = visible & (~visual_pair | (k > q - hollow_window)[None])
    return visible


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """RoPE (the half-split convention of all three backbones) on x [B, heads, S, head_dim]."""
    cos, sin = (t.unsqueeze(1) for t in rope)
    return x * cos + rotate_half(x) * sin


def attention(attn: Any, x: torch.Tensor, rope: Rope, visible: torch.Tensor) -> torch.Tensor:
    """Dense masked attention of one layer on normed x [B, S, d] -> o_proj output [B, S, d].

    GQA by repeating each kv head over its group of query heads; scale head_dim**-0.5.
    """
    batch, seq, _ = x.shape
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)  # [B, H, S, hd]
    k = attn.k_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
    v = attn.v_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary(q, rope), apply_rotary(k, rope)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5  # [B, H, S, S]
    scores = scores.masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
    out = scores.softmax(dim=-1) @ v  # [B, H, S, hd]
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def pad_ffn_channels(mlp: Any, probes: torch.Tensor, keep_channels: int) -> torch.Tensor:
    """The K channel indices the probe tokens [P, d] find most active: TopK of mean_p |m_pc|."""
    m = mlp.act_fn(mlp.gate_proj(probes)) * mlp.up_proj(probes)  # [P, d_ff]
    return m.abs().mean(dim=0).topk(keep_channels).indices  # [K]


def pad_ffn_visual(mlp: Any, x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The FFN of visual tokens x [V, d] on the given channels only: the K weight rows are gathered.

    ``W_down[:, idx] · (act(W_gate[idx]·x) ⊙ (W_up[idx]·x))``; no biases (the checked MLPs have none).
    """
    gate = x @ mlp.gate_proj.weight[channels].T  # [V, K]
    up = x @ mlp.up_proj.weight[channels].T
    return (mlp.act_fn(gate) * up) @ mlp.down_proj.weight[:, channels].T  # [V, d]


class ReducedDecoder:
    """The LLaVA text decoder with Hollow Attention and PAD-FFN on the layers ``reductions`` names.

    With empty :class:`Reductions` it equals transformers (dense attention instead of SDPA: within
    float rounding). It never modifies the model, so one loaded model can back many decoders.
    """

    def __init__(self, model: Any, reductions: Reductions | None = None) -> None:
        self.model = model
        self.lm = model.model.language_model
        self.reductions = reductions = reductions if reductions is not None else Reductions()
        self.num_layers = len(self.lm.layers)
        reductions.check_layers(self.num_layers)
        self.sliding = sliding_windows(self.lm.config)
        for i in reductions.ffn_layers:
            mlp = self.lm.layers[i].mlp
            if any(p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
                raise RlensError(f"layer {i}'s FFN has biases, which PAD-FFN does not support")

    def hidden_states(
        self,
        inputs: ReferenceInputs,
        start_layer: int = 0,
        start_hidden: torch.Tensor | None = None,
        stop_layer: int | None = None,
    ) -> torch.Tensor:
        """The residual stream [B, S, d] after layers ``[start_layer, stop_layer)`` (before the final norm).

        ``start_hidden`` is the stream entering ``start_layer`` (the embeddings when None, which then
        requires ``start_layer == 0``). Starting above layer 0 lets the ranking reuse the unreduced
        activations below the earliest reduced layer: they do not depend on the reductions.
        """
        stop = self.num_layers if stop_layer is None else stop_layer
        assert 0 <= start_layer <= stop <= self.num_layers, (start_layer, stop, self.num_layers)
        if start_hidden is None:
            assert start_layer == 0, f"start_layer {start_layer} needs the start_hidden entering it"
            start_hidden = inputs.inputs_embeds
        hidden = start_hidden
        with torch.no_grad():
            rope = self.lm.rotary_emb(hidden, inputs.position_ids)
            visual = inputs.visual_mask()
            for i in range(start_layer, stop):
                hidden = self.layer(i, hidden, inputs, rope, visual)
        return hidden

    def layer(
        self, i: int, hidden: torch.Tensor, inputs: ReferenceInputs, rope: Rope, visual: torch.Tensor
    ) -> torch.Tensor:
        """One pre-norm decoder layer: h + attn(norm(h)), then h + ffn(norm(h))."""
        layer = self.lm.layers[i]
        visible = self.mask(i, inputs)
        hidden = hidden + attention(layer.self_attn, layer.input_layernorm(hidden), rope, visible)
        return hidden + self.ffn(i, layer.post_attention_layernorm(hidden), inputs, visual)

    def mask(self, i: int, inputs: ReferenceInputs) -> torch.Tensor:
        """Layer i's [B, S, S] visibility (see :func:`visibility`)."""
        hollow = self.reductions.hollow_window if self.reductions.is_hollow(i) else None
        return visibility(inputs.attention_mask, inputs.visual_mask(), self.sliding[i], hollow)

    def attention_output(self, i: int, inputs: ReferenceInputs, hidden: torch.Tensor) -> torch.Tensor:
        """Layer i's attention sublayer output (o_proj, before the residual add) for the stream entering it.

        Exposed for checking the attention mask block by block against a graph or a brute-force loop.
        """
        layer = self.lm.layers[i]
        with torch.no_grad():
            rope = self.lm.rotary_emb(hidden, inputs.position_ids)
            return attention(layer.self_attn, layer.input_layernorm(hidden), rope, self.mask(i, inputs))

    def ffn(self, i: int, x: torch.Tensor, inputs: ReferenceInputs, visual: torch.Tensor) -> torch.Tensor:
        """Layer i's FFN output [B, S, d] on post-attention-normed x: PAD-FFN for visual tokens if reduced."""
        mlp = self.lm.layers[i].mlp
        if not self.reductions.is_pad_ffn(i):
            return mlp(x)
        out = torch.zeros_like(x)
        out[~visual] = mlp(x[~visual])  # text and padding: the full FFN
        keep = ffn_keep_channels(self.reductions.ffn_keep, mlp.gate_proj.out_features)
        if keep == 0:
            return out  # the skip branch: visual tokens keep only the residual
        start = inputs.visual_start
        for row, length in enumerate(inputs.visual_lengths):
            if length == 0:
                continue
            tokens = x[row, start : start + length]  # [V, d]
            probes = tokens[probe_indices(length, self.reductions.probe_every)]  # [P, d]
            channels = pad_ffn_channels(mlp, probes, keep)
            out[row, start : start + length] = pad_ffn_visual(mlp, tokens, channels)
        return out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [..., d] -> logits [..., vocab]."""
        with torch.no_grad():
            return self.model.lm_head(self.lm.norm(hidden))

    def logits(
        self,
        inputs: ReferenceInputs,
        all_positions: bool = False,
        start_layer: int = 0,
        start_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the last column [B, vocab], or of every column [B, S, vocab] with ``all_positions``.

        ``start_layer`` / ``start_hidden`` as in :meth:`hidden_states`.
        """
        hidden = self.hidden_states(inputs, start_layer=start_layer, start_hidden=start_hidden)
        return self.head(hidden if all_positions else hidden[:, -1])

    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_ids: list[int],
    ) -> list[int]:
        """Greedy new tokens for one prompt (batch 1), the EOS included when it comes, like the runtime.

        Each step recomputes the whole sequence (no KV cache): correct because a later token never
        changes an earlier one's activations, reductions included (they act on the visual span only).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        assert input_ids.shape[0] == 1, f"generate takes one prompt, got a batch of {input_ids.shape[0]}"
        inputs = prepare_inputs(self.model, input_ids, pixel_values)
        embed = self.model.model.get_input_embeddings()
        eos = set(eos_token_ids)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.logits(inputs)[0].argmax())
            tokens.append(token)
            if token in eos:
                break
            with torch.no_grad():
                inputs = inputs.append(embed(torch.tensor([[token]])).float())
        return tokens
