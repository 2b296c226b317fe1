"""``--precision fp16``: the decoder in float16 with RMSNorm and the rotary tables kept in float32.

The islands are checked where float16 breaks without them (hidden states past 256, positions past
2048), each against a control with the islands taken away. The exported artifact is checked against
the fp32 artifact of the same checkpoint: its interface types, the same greedy answers, batched rows
with padding (the float16 mask bias), and logits within the documented tolerance at every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import REDUCTION_FLAGS, Exported
from test_precision import check_against_fp32, greedy, validated_at

from rlens.cli.main import main as rlens_main
from rlens.errors import RlensError
from rlens.graphs import half
from rlens.graphs.attention import rotary_tables
from rlens.graphs.builder import FLOAT, INT64, GraphBuilder
from rlens.graphs.layers import rms_norm
from rlens.manifest import read_manifest
from rlens.runtime.pipeline import Pipeline
from rlens.tensorrt.engines import missing_requirement


def run_half(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The graph's own arithmetic: no ORT fusion, whose RMSNorm kernel would compute in float32 anyway
    (TensorRT's strongly typed networks keep each op's type as written)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.to_proto(half.to_half(model)).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def norm_then_matmul() -> ir.Model:
    b = GraphBuilder("t")
    x = b.input("inputs_embeds", FLOAT, ["n", 8])
    y = rms_norm(b, x, ir.Tensor(np.linspace(0.5, 1.5, 8).astype(np.float32), name="norm.weight"), 1e-6)
    w = np.random.default_rng(0).normal(0, 0.3, (8, 4)).astype(np.float32)
    b.output(b.op("MatMul", y, b.weight(ir.Tensor(w, name="proj.weight"))), "logits", FLOAT, ["n", 4])
    return b.build()


def test_rms_norm_stays_float32_where_float16_overflows(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(1).normal(0, 400, (3, 8)).astype(np.float32)  # x^2 far past 65504
    w = np.random.default_rng(0).normal(0, 0.3, (8, 4))
    normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    expected = (normed * np.linspace(0.5, 1.5, 8)) @ w
    out = run_half(norm_then_matmul(), {"inputs_embeds": x})  # the converted graph computes the norm
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=2e-2)
    assert input_types(norm_then_matmul(), "Pow") == {onnx.TensorProto.FLOAT}
    # the control: without the island the square is float16 (ORT's CPU kernels hide that by running
    # the chain in float32 between two casts; a strongly typed TensorRT network would not)
    monkeypatch.setattr(half, "FP32_ISLANDS", ())
    assert input_types(norm_then_matmul(), "Pow") == {onnx.TensorProto.FLOAT16}


def input_types(model: ir.Model, op_type: str) -> set[int]:
    """The element types of the first inputs of ``op_type`` nodes in the float16 graph (ONNX inference)."""
    proto = onnx.shape_inference.infer_shapes(ir.to_proto(half.to_half(model)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input]}
    return {types[n.input[0]] for n in proto.graph.node if n.op_type == op_type}


def rotary_cos() -> ir.Model:
    b = GraphBuilder("t")
    positions = b.input("position_ids", INT64, [1, "s"])
    inv_freq = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    cos, _ = rotary_tables(b, positions, inv_freq, 1.0)
    b.output(b.op("Mul", cos, b.const(1.0, np.float32)), "logits", FLOAT, [1, 1, "s", 8])  # read outside
    return b.build()


def test_rotary_tables_stay_float32_past_float16s_integers(monkeypatch: pytest.MonkeyPatch) -> None:
    positions = np.array([[2049, 3001, 4095]], np.int64)  # float16 spaces integers 2 and 4 apart here
    inv_freq = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    angles = positions[0, :, None] * np.concatenate([inv_freq, inv_freq])
    expected = np.cos(angles)[None, None]
    np.testing.assert_allclose(run_half(rotary_cos(), {"position_ids": positions}), expected, atol=2e-3)
    monkeypatch.setattr(half, "FP32_ISLANDS", ())
    assert np.abs(run_half(rotary_cos(), {"position_ids": positions}) - expected).max() > 0.3


@pytest.fixture(scope="module")
def fp16(exported: dict[str, Exported], reduced_trim: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The llama checkpoint at fp16: unreduced, and with ``reduced_trim``'s reductions and TRIM."""
    root, checkpoint = tmp_path_factory.mktemp("fp16"), str(exported["llama"].checkpoint)
    assert rlens_main(["export", checkpoint, "-o", str(root / "plain"), "-q", "--precision", "fp16"]) == 0
    flags = [*REDUCTION_FLAGS, "--clip-model", str(reduced_trim.parent / "clip"), "--precision", "fp16"]
    assert rlens_main(["export", checkpoint, "-o", str(root / "reduced"), "-q", *flags]) == 0
    return {"plain": root / "plain", "reduced": root / "reduced"}


def test_fp16_artifact_answers_as_fp32(fp16: dict, exported: dict[str, Exported], image_file: Path) -> None:
    artifact = fp16["plain"]
    manifest = validated_at(artifact, "fp16")
    decoder = manifest.graphs["decoder"]
    types = {t.name: t.dtype for t in [*decoder.inputs, *decoder.outputs]}
    assert types["inputs_embeds"] == types["logits"] == "float"  # the pipeline's side stays float32
    assert types["past_key_values.0.key"] == types["present.0.value"] == "float16"
    initializers = ir.load(artifact / "decoder.onnx").graph.initializers.values()
    kinds = {value.name: value.dtype for value in initializers if value.dtype in (half.FLOAT, half.FLOAT16)}
    float32 = {name for name, dtype in kinds.items() if dtype == half.FLOAT}
    assert all("layernorm" in n or n.startswith(("norm", "const", "model.norm")) for n in float32), float32
    assert sum(dtype == half.FLOAT16 for dtype in kinds.values()) > len(float32)

    fp32 = exported["llama"].artifact
    errors = check_against_fp32(artifact, fp32, "fp16", tokens=16)
    assert min(errors) > 1e-6  # float16, not a copy of the fp32 graph
    assert greedy(Pipeline.load(artifact), 7) == greedy(Pipeline.load(fp32), 7)
    # rows of different lengths: left padding, keys masked by the float16 mask bias
    images, prompts = [image_file, None], ["What is in the picture?", "Say something longer than that"]
    expected = Pipeline.load(fp32).generate_batch(images, prompts, 8, do_sample=False)
    answers = Pipeline.load(artifact).generate_batch(images, prompts, 8, do_sample=False)
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]


def test_fp16_with_reductions_and_trim_stays_within_its_tolerance(fp16: dict, reduced_trim: Path) -> None:
    assert validated_at(fp16["reduced"], "fp16").trim is not None
    check_against_fp32(fp16["reduced"], reduced_trim, "fp16", tokens=8)


def test_fp16_goes_to_tensorrt_and_passes_its_check(exported: dict[str, Exported], tmp_path: Path) -> None:
    out = tmp_path / "trt16"
    args = ["export", str(exported["llama"].checkpoint), "-o", str(out), "-q", "--precision", "fp16"]
    code = rlens_main([*args, *REDUCTION_FLAGS, "--target", "tensorrt"])
    # engines where TensorRT and a GPU are; elsewhere the build stops after the ONNX files are complete
    assert code == (0 if missing_requirement() is None else 1)
    assert read_manifest(out).precision == "fp16"
    assert rlens_main(["check", "--tensorrt", str(out)]) == 0


def test_a_float_source_the_pass_does_not_rewrite_is_refused() -> None:
    b = GraphBuilder("t")
    x = b.input("inputs_embeds", FLOAT, ["n", 2])
    bias = b.op("Constant", value=ir.Tensor(np.ones(2, np.float32)))  # float32 the pass cannot see
    b.output(b.op("Add", x, bias), "logits", FLOAT, ["n", 2])
    with pytest.raises(RlensError, match="does not convert Constant nodes"):
        half.to_half(b.build())
