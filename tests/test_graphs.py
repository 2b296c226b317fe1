"""Each graph block built alone, run in ONNX Runtime, compared with its PyTorch reference.

The end-to-end parity tests would catch a wrong block too, but only as "logits differ"; these say
which block, and cover corners the tiny models do not reach (padding rows, windows, GQA ratios).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from rlens.graphs.attention import MASKED, apply_rotary, attention, causal_mask, chunk_of, rotary_tables
from rlens.graphs.builder import BOOL, FLOAT, INT64, ArrayWeights, GraphBuilder
from rlens.graphs.layers import activation, rms_norm

rng = np.random.default_rng(0)


def run_graph(
    build: Callable[[GraphBuilder, list[ir.Value]], ir.Value],
    feeds: dict[str, np.ndarray],
    out_dtype: ir.DataType = FLOAT,
) -> np.ndarray:
    """Build a one-output graph over ``feeds`` (names and arrays) and run it in ONNX Runtime."""
    b = GraphBuilder("test")
    types = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64, np.dtype(bool): BOOL}
    inputs = [
        b.input(name, types[a.dtype], [f"{name}_{i}" for i in range(a.ndim)]) for name, a in feeds.items()
    ]
    b.output(build(b, inputs), "y", out_dtype, [])
    model = ir.to_proto(b.build())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_rms_norm_equals_transformers() -> None:
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    ref = LlamaRMSNorm(16, eps=1e-6)
    ref.weight.data = torch.from_numpy(rng.normal(1, 0.1, size=16).astype(np.float32))
    got = run_graph(lambda b, i: rms_norm(b, i[0], ir.Tensor(ref.weight.detach().numpy()), 1e-6), {"x": x})
    np.testing.assert_allclose(got, ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "quick_gelu"])
def test_activations_equal_transformers(name: str) -> None:
    from transformers.activations import ACT2FN

    x = rng.normal(size=(4, 9)).astype(np.float32) * 3
    got = run_graph(lambda b, i: activation(b, i[0], name), {"x": x})
    np.testing.assert_allclose(got, ACT2FN[name](torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_rotary_equals_transformers() -> None:
    B, H, S, D = 2, 3, 7, 8
    q = rng.normal(size=(B, H, S, D)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]], dtype=np.int64)
    inv_freq = 1.0 / (10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)

    def build(b: GraphBuilder, i: list[ir.Value]) -> ir.Value:
        cos, sin = rotary_tables(b, i[1], inv_freq, 1.0)
        return apply_rotary(b, i[0], cos, sin, D)

    got = run_graph(build, {"q": q, "position_ids": positions})
    freqs = torch.from_numpy(positions).float()[..., None] * torch.from_numpy(inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    expected, _ = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(q), emb.cos(), emb.sin())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def reference_mask(attention_mask: np.ndarray, new: int, window: int | None) -> np.ndarray:
    total = attention_mask.shape[1]
    q = np.arange(total - new, total)[:, None]
    k = np.arange(total)[None, :]
    visible = k <= q
    if window is not None:
        visible &= k > q - window
    return visible[None] & attention_mask[:, None, :].astype(bool)  # [B, S, T]


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("new", [1, 6])
def test_causal_mask(window: int | None, new: int) -> None:
    attention_mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.int64)
    embeds = np.zeros((2, new, 4), np.float32)

    def build(b: GraphBuilder, i: list[ir.Value]) -> ir.Value:
        return causal_mask(b, chunk_of(b, i[0], i[1]), window)

    got = run_graph(build, {"x": embeds, "attention_mask": attention_mask})
    np.testing.assert_array_equal(got[:, 0] == 0, reference_mask(attention_mask, new, window))
    assert set(np.unique(got)) <= {0.0, MASKED}


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_attention_equals_sdpa(heads: int, kv_heads: int) -> None:
    B, S, T, D = 2, 5, 9, 8
    q = rng.normal(size=(B, heads, S, D)).astype(np.float32)
    k = rng.normal(size=(B, kv_heads, T, D)).astype(np.float32)
    v = rng.normal(size=(B, kv_heads, T, D)).astype(np.float32)
    mask = reference_mask(np.array([[0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 9]), S, None)[:, None]  # [B,1,S,T]

    got = run_graph(
        lambda b, i: attention(b, i[0], i[1], i[2], i[3], heads, kv_heads, D),
        {"q": q, "k": k, "v": v, "mask": np.where(mask, 0.0, MASKED).astype(np.float32)},
    )
    rep = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        torch.from_numpy(q),
        torch.from_numpy(k).repeat_interleave(rep, 1),
        torch.from_numpy(v).repeat_interleave(rep, 1),
        attn_mask=torch.from_numpy(mask),
    )
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_attention_on_a_fully_masked_row_is_finite() -> None:
    """Left padding makes rows with no visible key; they must not become NaN and poison the cache."""
    q = rng.normal(size=(1, 2, 2, 4)).astype(np.float32)
    k = rng.normal(size=(1, 2, 2, 4)).astype(np.float32)
    mask = np.where(np.array([[[[False, False], [True, True]]]]), 0.0, MASKED).astype(np.float32)
    q[0, 0, 0] = -1e4  # a large score of either sign must not push a masked one to -inf
    got = run_graph(
        lambda b, i: attention(b, i[0], i[1], i[1], i[2], 2, 2, 4), {"q": q, "k": k, "mask": mask}
    )
    assert np.isfinite(got).all()


def test_array_weights_transpose_lazily() -> None:
    w = ArrayWeights({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    t = w.get("w", transpose=True)
    assert tuple(t.shape) == (3, 2)
    np.testing.assert_array_equal(t.numpy(), np.arange(6).reshape(2, 3).T)
