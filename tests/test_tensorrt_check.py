"""``rlens check --tensorrt``: the exported graphs pass TensorRT's parser rules, and broken ones fail clearly.

The unreduced artifacts come from the session's ``exported`` fixture; one more export here carries
every graph variant at once (Hollow Attention and PAD-FFN in the decoder, and trim.onnx). Graphs
that must fail are built in code with ``onnx.helper``: a contrib op, an op TensorRT has no importer
for, a graph output whose size the data decides, and one of each documented restriction.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import Exported
from onnx import TensorProto, helper, numpy_helper

from rlens.cli.main import main as rlens_main
from rlens.errors import RlensError
from rlens.manifest import read_manifest
from rlens.tensorrt.check import check_artifact, check_model
from rlens.tensorrt.engines import EngineLimits, build_engines, missing_requirement, profiles_for
from rlens.tensorrt.support import OPERATORS, UNSUPPORTED, parse_target

TARGET = parse_target("10.15")


def graph(nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits=(), opset: int = 21, extra=()):
    return helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
        opset_imports=[helper.make_opsetid("", opset), *extra],
    )


def tensor(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name: str, value: object, dtype: type = np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def problems(model: onnx.ModelProto, version: str = "10.15") -> list[str]:
    return [p.line() for p in check_model(model, "g", parse_target(version)).problems]


# -- the real graphs ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["llama", "mistral", "qwen2"])
def test_unreduced_artifacts_pass(exported: dict[str, Exported], backbone: str) -> None:
    report = check_artifact(exported[backbone].artifact, TARGET)
    assert report.ok, [p.line() for p in report.problems]
    assert [g.name for g in report.graphs] == ["vision", "embedding", "decoder"]
    embedding = next(g for g in report.graphs if g.name == "embedding")
    assert embedding.notes == []  # CumSum + Gather + Where: no size depends on the data


def test_reduced_and_trim_artifact_passes(reduced_trim: Path) -> None:
    report = check_artifact(reduced_trim, TARGET)
    assert report.ok, [p.line() for p in report.problems]
    graphs = {g.name: g for g in report.graphs}
    assert set(graphs) == {"vision", "embedding", "decoder", "trim"}
    decoder_ops = {u.op for u in graphs["decoder"].ops}
    assert {"TopK", "GatherND", "Range"} <= decoder_ops  # PAD-FFN's channel pick, hollow blocks
    assert all(u.status == "ok" for g in graphs.values() for u in g.ops)
    # the span inputs set sizes: a note for the engine build, not a failure
    assert any("visual_start" in note for note in graphs["decoder"].notes)


def test_cli_json_and_table(reduced_trim: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rlens_main(["check", "--tensorrt", str(reduced_trim), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["tensorrt_version"] == "10.15" and out["problems"] == []
    assert set(out["graphs"]) == {"vision", "embedding", "decoder", "trim"}
    assert rlens_main(["check", "--tensorrt", str(reduced_trim)]) == 0
    text = capsys.readouterr().out
    assert "decoder: decoder.onnx, opset 21, pass" in text and text.rstrip().endswith("all 4 graphs pass")


def test_older_tensorrt_refuses_the_opset(
    exported: dict[str, Exported], capsys: pytest.CaptureFixture
) -> None:
    """TensorRT 10.0 to 10.5 document opset 20 at most; the graphs are opset 21."""
    artifact = str(exported["llama"].artifact)
    assert rlens_main(["check", "--tensorrt", artifact, "--trt-version", "10.2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "3 problems:" in lines
    assert "decoder: opset 21 is outside what TensorRT 10.2's ONNX parser documents (opset 9 to 20)" in lines


def test_cli_fails_with_one_line_per_problem(
    exported: dict[str, Exported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An artifact whose embedding graph was swapped for one with an ONNX Runtime contrib op."""
    artifact = tmp_path / "artifact"
    shutil.copytree(exported["llama"].artifact, artifact)
    onnx.save(contrib_graph(), artifact / "embedding.onnx")
    assert rlens_main(["check", "--tensorrt", str(artifact)]) == 1
    out = capsys.readouterr().out
    assert "embedding: embedding.onnx, opset 21, FAIL" in out
    failures = out[out.index("1 problem:") :].splitlines()[1:]
    assert failures == [
        "embedding: fused (FusedMatMul): op of domain 'com.microsoft': TensorRT's ONNX parser imports only "
        "the default ONNX domain (an ONNX Runtime contrib op would need a TensorRT plugin); use standard ops"
    ]
    assert rlens_main(["check", "--tensorrt", str(artifact), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"] == failures


@pytest.mark.parametrize("args", [["check", "--tensorrt", "no-such-dir"], ["check", "no-such-dir"]])
def test_cli_one_line_error(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path / a) if a == "no-such-dir" else a for a in args]
    assert rlens_main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("rlens: error: "), err


def test_cli_refuses_a_dir_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rlens_main(["check", "--tensorrt", str(tmp_path)]) == 1
    assert "has no rlens.json" in capsys.readouterr().err


# -- graphs that must fail ------------------------------------------------------------------------


def contrib_graph() -> onnx.ModelProto:
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], name="fused", domain="com.microsoft")
    return graph(
        [node],
        [tensor("a", TensorProto.FLOAT, [2, 3]), tensor("b", TensorProto.FLOAT, [3, 4])],
        [tensor("y", TensorProto.FLOAT, [2, 4])],
        extra=[helper.make_opsetid("com.microsoft", 1)],
    )


def test_contrib_op_fails() -> None:
    (line,) = problems(contrib_graph())
    assert line.startswith("g: fused (FusedMatMul): op of domain 'com.microsoft'")


def test_unsupported_op_fails() -> None:
    node = helper.make_node("Det", ["x"], ["y"], name="det")
    model = graph([node], [tensor("x", TensorProto.FLOAT, [3, 3])], [tensor("y", TensorProto.FLOAT, [])])
    assert problems(model) == [
        "g: det (Det): Det is not supported by TensorRT's ONNX parser (operators.md marks it N)"
    ]


def test_data_dependent_output_fails() -> None:
    """NonZero's count is the output's size: nothing bounds it when the engine is built."""
    node = helper.make_node("NonZero", ["x"], ["y"], name="nz")
    model = graph([node], [tensor("x", TensorProto.FLOAT, ["n"])], [tensor("y", TensorProto.INT64, [1, "k"])])
    (line,) = problems(model)
    assert line.startswith("g: y (output): data-dependent size, decided by NonZero 'nz'")


def test_data_dependent_size_inside_passes_with_a_note() -> None:
    """As the embedding graph: NonZero's count sizes the scatter indices, not the output."""
    nodes = [
        helper.make_node("NonZero", ["mask"], ["nz"], name="nz"),
        helper.make_node("Transpose", ["nz"], ["idx"], perm=[1, 0]),
        helper.make_node("ScatterND", ["x", "idx", "rows"], ["y"], name="scatter"),
    ]
    inputs = [
        tensor("x", TensorProto.FLOAT, ["s", 4]),
        tensor("mask", TensorProto.BOOL, ["s"]),
        tensor("rows", TensorProto.FLOAT, ["r", 4]),
    ]
    report = check_model(graph(nodes, inputs, [tensor("y", TensorProto.FLOAT, ["s", 4])]), "g", TARGET)
    assert report.ok, report.problems
    assert any("NonZero 'nz'" in note for note in report.notes)


def test_size_from_a_float_input_fails() -> None:
    """A Reshape whose target shape is computed from data values (not shapes) sizes the output."""
    nodes = [
        helper.make_node("Cast", ["x"], ["as_int"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "as_int"], ["y"], name="reshape"),
    ]
    model = graph(
        [nodes[0], nodes[1]], [tensor("x", TensorProto.FLOAT, [2])], [tensor("y", TensorProto.FLOAT, None)]
    )
    assert any("data-dependent size, decided by Reshape 'reshape'" in line for line in problems(model))


def test_type_the_op_does_not_take_fails() -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    ints = [tensor("a", TensorProto.INT32, [2, 3]), tensor("b", TensorProto.INT32, [3, 4])]
    lines = problems(graph([node], ints, [tensor("y", TensorProto.INT32, [2, 4])]))
    assert lines[0] == "g: mm (MatMul): INT32 'a': TensorRT imports MatMul with BF16, FP16, FP32 only"


def test_wider_types_from_the_importer_pass() -> None:
    """Clip on INT64 (elementwise path) and CumSum on INT64 (Cumulative layer), as the decoder uses them."""
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"], name="clip"),
        helper.make_node("CumSum", ["c", "axis"], ["y"], name="cumsum"),
    ]
    inits = [const("lo", 0), const("hi", 9), const("axis", 0)]
    model = graph(
        nodes, [tensor("x", TensorProto.INT64, ["n"])], [tensor("y", TensorProto.INT64, ["n"])], inits
    )
    assert problems(model) == []


def test_topk_limits() -> None:
    def topk(k: int, sorted_: int = 1) -> onnx.ModelProto:
        node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=sorted_)
        outputs = [tensor("v", TensorProto.FLOAT, [k]), tensor("i", TensorProto.INT64, [k])]
        return graph([node], [tensor("x", TensorProto.FLOAT, [5000])], outputs, [const("k", [k])])

    assert problems(topk(3839)) == []
    assert problems(topk(3840)) == ["g: topk (TopK): K = 3840: TensorRT's TopK needs K < 3840"]
    assert problems(topk(8, sorted_=0)) == [
        "g: topk (TopK): sorted=0: TensorRT imports TopK with sorted=1 only"
    ]


def test_axes_computed_in_the_graph_fail() -> None:
    """ReduceSum's axes must be an initializer; a Squeeze without axes needs static dimensions."""
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["r"], name="reduce", keepdims=1),
        helper.make_node("Squeeze", ["r"], ["y"], name="squeeze"),
    ]
    model = graph(
        nodes,
        [tensor("x", TensorProto.FLOAT, ["n", 1]), tensor("axes", TensorProto.INT64, [1])],
        [tensor("y", TensorProto.FLOAT, None)],
    )
    lines = problems(model)
    assert (
        "g: reduce (ReduceSum): axes 'axes' is computed in the graph; TensorRT needs it as an initializer"
        in lines
    )
    assert any(
        line.startswith("g: squeeze (Squeeze): no axes, and the input 'r' has dynamic") for line in lines
    )


def test_shape_arithmetic_folds_to_constants() -> None:
    """Axes derived from static shapes (Shape -> Gather -> Sub) count as build-time constants."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
        helper.make_node("Sub", ["d0", "one"], ["axes"]),
        helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsqueeze"),
    ]
    inits = [const("zero", [0]), const("one", [1])]
    model = graph(
        nodes, [tensor("x", TensorProto.FLOAT, [2, 3])], [tensor("y", TensorProto.FLOAT, None)], inits
    )
    assert problems(model) == []


def test_ops_newer_than_the_target_fail() -> None:
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="rms", axis=-1)
    inputs = [tensor("x", TensorProto.FLOAT, [2, 4]), tensor("scale", TensorProto.FLOAT, [4])]
    model = graph([node], inputs, [tensor("y", TensorProto.FLOAT, [2, 4])], opset=23)
    assert problems(model, "10.15") == []
    assert "g: rms (RMSNormalization): RMSNormalization is imported from TensorRT 10.15 on, not by 10.14" in (
        problems(model, "10.14")
    )


# -- versions, tables, engines --------------------------------------------------------------------


def test_targets() -> None:
    assert [parse_target(v).max_opset for v in ("10", "10.5", "10.6", "10.11.0.33", "10.15")] == [
        20,
        20,
        22,
        23,
        24,
    ]
    assert parse_target("10.20").beyond_table and not parse_target("10.15").beyond_table
    for bad in ("11.0", "9.3", "ten", ""):
        with pytest.raises(RlensError, match="TensorRT 10"):
            parse_target(bad)
    assert not set(OPERATORS) & UNSUPPORTED


def test_engine_profiles_follow_the_manifest(reduced_trim: Path) -> None:
    manifest = read_manifest(reduced_trim)
    profiles = profiles_for(manifest, EngineLimits(max_batch=2, max_context=300))
    prefill, decode = profiles["decoder"]
    rows = manifest.trim.max_tokens if manifest.trim else 0
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes["inputs_embeds"] == ((1, 1, 64), (1, rows + 64, 64), (2, 300, 64))
    assert prefill.shapes["past_key_values.0.key"][2][2] == 0 and decode.shapes["inputs_embeds"][2][1] == 1
    assert decode.shapes["attention_mask"] == ((1, 2), (1, rows + 65), (2, 300))
    assert prefill.values == {"visual_start": (0, 8, 299), "visual_lengths": (0, rows, rows)}
    assert profiles["embedding"][0].shapes["image_features"] == ((0, 64), (rows, 64), (2 * rows, 64))
    assert profiles["trim"][0].shapes["clip_input_ids"] == ((1, 1), (1, 16), (2, 77))


def test_engine_build_without_tensorrt_stops_with_a_clear_message(exported: dict[str, Exported]) -> None:
    if missing_requirement() is None:
        pytest.skip("tensorrt and a GPU are here: the GPU tests build engines")
    artifact = exported["llama"].artifact  # unreduced: a graph set TensorRT could build
    with pytest.raises(RlensError, match="TensorRT engines need the tensorrt package and an NVIDIA GPU") as e:
        build_engines(artifact, read_manifest(artifact), EngineLimits(4, 256))
    # the command to run where TensorRT is, with the bounds this build was asked for
    assert str(e.value).endswith(f"`rlens engines {artifact} --max-batch 4 --max-context 256`")
    assert not list(artifact.glob("*.engine"))
