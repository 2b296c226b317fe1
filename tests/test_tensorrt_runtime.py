"""The engine runtime without a GPU: refusing foreign engines, profile choice, and the run plumbing.

A fake ``tensorrt`` module stands in for the real one (``sys.modules``), and the GPU query is
monkeypatched. Its engines run the artifact's own ONNX graph with ONNX Runtime, reading inputs from
and writing outputs to the addresses the session hands over (CPU torch tensors and, for the span
inputs, host arrays as TensorRT's shape tensors), so a pipeline on these engines must give the CPU
pipeline's tokens exactly: that holds the session's buffers, shapes, profile switches and the KV
cache it keeps as device tensors to the real thing, everything but TensorRT itself.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import Exported

from rlens.cli.main import main as rlens_main
from rlens.errors import RlensError
from rlens.manifest import TensorRTInfo, read_manifest, write_manifest
from rlens.runtime.pipeline import Pipeline
from rlens.tensorrt import engines
from rlens.tensorrt.engines import EngineLimits, profiles_for, resolve_limits
from rlens.tensorrt.runtime import Engines, refuse_incompatible, select_profile, uses_engines

VERSION, GPU = "10.8.0.43", ("NVIDIA H100 80GB HBM3", "9.0")
SPAN = ("visual_start", "visual_lengths")  # the inputs a TensorRT build takes as shape tensors
BATCH_2 = EngineLimits(max_batch=2)
ORT_TYPES = {
    "tensor(float)": ("FLOAT", np.float32),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(bool)": ("BOOL", np.bool_),  # the TensorRT track's span marker
}


# -- a fake tensorrt whose engines are ONNX Runtime sessions on host memory -----------------------


def memory(address: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The array at ``address``, writable in place (what a CUDA kernel sees of a buffer)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size == 0:
        return np.empty(shape, dtype)
    return np.frombuffer((ctypes.c_char * size).from_address(address), dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.addresses, self.shapes = engine, {}, {}
        self.profiles: list[int] = []  # every switch, in order
        self.results: dict[str, np.ndarray] | None = None

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profiles.append(index)
        return 0 <= index < self.engine.num_optimization_profiles

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name], self.results = address, None
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name], self.results = tuple(shape), None
        return True

    def outputs(self) -> dict[str, np.ndarray]:
        if self.results is None:  # run as soon as every input is in place: output shapes come from it
            feeds = {
                i.name: memory(self.addresses[i.name], self.shapes[i.name], ORT_TYPES[i.type][1]).copy()
                for i in self.engine.session.get_inputs()
            }
            names = [o.name for o in self.engine.session.get_outputs()]
            self.results = dict(zip(names, self.engine.session.run(None, feeds), strict=True))
        return self.results

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.outputs()[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        for name, value in self.outputs().items():
            memory(self.addresses[name], value.shape, value.dtype)[...] = value
        self.results = None
        return True


class FakeEngine:
    def __init__(self, onnx_path: str, profiles: int) -> None:
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.num_optimization_profiles = profiles
        self.types = {t.name: t.type for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.contexts: list[FakeContext] = []

    def get_tensor_dtype(self, name: str) -> Any:
        return types.SimpleNamespace(name=ORT_TYPES[self.types[name]][0])

    def get_tensor_location(self, name: str) -> Any:
        return types.SimpleNamespace(name="HOST" if name in SPAN else "DEVICE")

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeRuntime:
    def __init__(self, logger: Any) -> None:
        FakeTensorRT.runtimes += 1

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        FakeTensorRT.deserialized += 1
        try:
            plan = json.loads(data)
        except ValueError:
            return None  # what TensorRT returns for a plan it cannot read
        engine = FakeEngine(plan["onnx"], plan["profiles"])
        FakeTensorRT.engines.append(engine)
        return engine


class FakeLogger:
    WARNING = 2

    def __init__(self, severity: int) -> None:
        self.severity = severity


class FakeTensorRT(types.ModuleType):
    """What ``rlens.tensorrt.runtime`` uses of ``tensorrt``: the version, a logger, a runtime."""

    runtimes = deserialized = 0
    engines: list[FakeEngine] = []  # noqa: RUF012

    def __init__(self, version: str = VERSION) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.Logger = FakeLogger
        self.Runtime = FakeRuntime
        FakeTensorRT.runtimes = FakeTensorRT.deserialized = 0
        FakeTensorRT.engines = []


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    """This machine: TensorRT ``VERSION`` on ``GPU`` (a fake module, a patched query)."""
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(engines, "current_gpu", lambda: GPU)
    return fake


def fake_build(
    artifact: Path, limits: EngineLimits = BATCH_2, built_on: tuple[str, str, str] = (VERSION, *GPU)
) -> Path:
    """What ``build_engines`` leaves: a plan per graph (here: which ONNX file to run) and the record."""
    manifest = read_manifest(artifact)
    profiles = profiles_for(manifest, limits)
    for name, graph in manifest.graphs.items():
        plan = {"onnx": str(artifact / graph.file), "profiles": len(profiles[name])}
        (artifact / f"{name}.engine").write_text(json.dumps(plan))
    resolved = resolve_limits(manifest, limits)
    assert resolved.max_context is not None and resolved.max_visual_tokens is not None
    info = TensorRTInfo(
        version=built_on[0],
        gpu=built_on[1],
        compute_capability=built_on[2],
        engines={name: f"{name}.engine" for name in manifest.graphs},
        profiles={name: [p.name for p in ps] for name, ps in profiles.items()},
        max_batch=resolved.max_batch,
        max_context=resolved.max_context,
        max_visual_tokens=resolved.max_visual_tokens,
    )
    write_manifest(replace(manifest, tensorrt=info), artifact)
    return artifact


def on_engines(artifact: Path, device: torch.device) -> Pipeline:
    """The artifact's pipeline with every graph on its engine (what ``--provider tensorrt`` will open)."""
    pipeline = Pipeline.load(artifact, provider="cpu")
    opened = Engines(artifact, pipeline.manifest, device=device)
    for name in pipeline.manifest.graphs:
        setattr(pipeline, name, opened.open(name))
    return pipeline


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / artifact.name))


# -- refusing engines built elsewhere -------------------------------------------------------------


@pytest.mark.parametrize(
    "built_on",
    [
        ("10.7.0.23", *GPU),  # another TensorRT release
        (VERSION, "NVIDIA A100-SXM4-80GB", "8.0"),  # another GPU generation
        (VERSION, "NVIDIA H100 PCIe", "9.0"),  # another model of the same generation
    ],
)
def test_engines_from_another_release_or_gpu_are_refused_before_loading(
    exported: dict[str, Exported], tmp_path: Path, machine: FakeTensorRT, built_on: tuple[str, str, str]
) -> None:
    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path), built_on=built_on)
    with pytest.raises(RlensError) as error:
        Engines(artifact, read_manifest(artifact), device=torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message
    assert (
        f"built with TensorRT {built_on[0]} for {built_on[1]} (compute capability {built_on[2]})" in message
    )
    assert f"this machine has TensorRT {VERSION} and {GPU[0]} ({GPU[1]})" in message
    assert f"rebuild them here with `rlens engines {artifact}`" in message
    assert FakeTensorRT.runtimes == 0 and FakeTensorRT.deserialized == 0  # refused before TensorRT saw it


def test_refuse_incompatible_passes_the_same_machine(exported: dict[str, Exported], tmp_path: Path) -> None:
    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path))
    info = read_manifest(artifact).tensorrt
    assert info is not None
    refuse_incompatible(info, VERSION, GPU, artifact)  # no error


@pytest.mark.parametrize("missing", ["package", "gpu"])
def test_engines_without_tensorrt_or_gpu_say_what_is_missing(
    exported: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path))
    if missing == "package":
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
        expected = "the tensorrt package is not installed"
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
        monkeypatch.setattr(engines, "current_gpu", lambda: None)
        expected = "no NVIDIA GPU is visible"
    with pytest.raises(RlensError, match=f"need TensorRT and a GPU: {expected}"):
        Engines(artifact, read_manifest(artifact))


def test_an_artifact_without_engines_is_refused(exported: dict[str, Exported], machine: FakeTensorRT) -> None:
    artifact = exported["llama"].artifact
    expected = r"has no TensorRT engines; build them on the GPU machine with `rlens engines .*llama"
    with pytest.raises(RlensError, match=expected):
        Engines(artifact, read_manifest(artifact), device=torch.device("cpu"))


def test_missing_corrupt_and_stale_engines_say_rebuild(
    exported: dict[str, Exported], tmp_path: Path, machine: FakeTensorRT
) -> None:
    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path))
    opened = Engines(artifact, read_manifest(artifact), device=torch.device("cpu"))
    (artifact / "vision.engine").unlink()
    with pytest.raises(RlensError, match=r"engine of graph 'vision' is missing.*`rlens engines "):
        opened.open("vision")
    (artifact / "embedding.engine").write_bytes(b"\x00not a plan")
    with pytest.raises(RlensError, match=r"TensorRT could not load .*embedding.engine.*`rlens engines "):
        opened.open("embedding")
    plan = json.loads((artifact / "decoder.engine").read_text())
    (artifact / "decoder.engine").write_text(json.dumps({**plan, "profiles": 1}))
    with pytest.raises(
        RlensError, match=r"'decoder.engine' holds 1 optimization profile\(s\), rlens.json records 2"
    ):
        opened.open("decoder")
    manifest = read_manifest(artifact)
    assert manifest.tensorrt is not None
    stale = replace(manifest.tensorrt, profiles={**manifest.tensorrt.profiles, "decoder": ["all"]})
    with pytest.raises(
        RlensError, match=r"records profiles \['all'\] for 'decoder.engine', this rlens builds"
    ):
        Engines(artifact, replace(manifest, tensorrt=stale), device=torch.device("cpu")).open("decoder")


def test_provider_tensorrt_uses_engines_only_where_they_were_built(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    plain = read_manifest(exported["llama"].artifact)
    built = read_manifest(fake_build(copy_of(exported["llama"].artifact, tmp_path)))
    assert uses_engines(built, "tensorrt")
    assert not uses_engines(plain, "tensorrt")  # ONNX Runtime's TensorRT execution provider instead
    assert not uses_engines(built, "cuda") and not uses_engines(built, "cpu")


# -- profiles -------------------------------------------------------------------------------------


def test_the_decoder_call_picks_its_profile(reduced_trim: Path) -> None:
    manifest = read_manifest(reduced_trim)
    limits = EngineLimits(max_batch=2, max_context=64, max_visual_tokens=17)
    prefill, decode = profiles_for(manifest, limits)["decoder"]
    m = manifest.model

    def shapes(batch: int, sequence: int, past: int) -> dict[str, tuple[int, ...]]:
        caches = [t.name for t in manifest.graphs["decoder"].inputs if t.name.startswith("past_key_values")]
        return {
            "inputs_embeds": (batch, sequence, m.hidden_size),
            "attention_mask": (batch, past + sequence),
            "position_ids": (batch, sequence),
            **{name: (batch, m.num_kv_heads, past, m.head_dim) for name in caches},
            "visual_start": (),
            "visual_lengths": (batch,),
        }

    span = {"visual_start": [3], "visual_lengths": [17, 5]}
    assert select_profile([prefill, decode], shapes(2, 30, 0), span) == 0
    assert (
        select_profile([prefill, decode], shapes(2, 1, 30), {"visual_start": [0], "visual_lengths": [0, 0]})
        == 1
    )
    assert select_profile([prefill, decode], shapes(3, 30, 0), span) is None  # batch beyond --max-batch
    assert select_profile([prefill, decode], shapes(1, 65, 0), span) is None  # prompt beyond --max-context
    assert select_profile([prefill, decode], shapes(2, 30, 0), {**span, "visual_lengths": [18, 0]}) is None


# -- running: the pipeline on (fake) engines gives the CPU pipeline's tokens ----------------------


@pytest.mark.parametrize("which", ["llama", "reduced_trim"])
def test_pipeline_on_engines_matches_the_cpu_pipeline(
    which: str,
    exported: dict[str, Exported],
    reduced_trim: Path,
    tmp_path: Path,
    image_file: Path,
    machine: FakeTensorRT,
) -> None:
    source = reduced_trim if which == "reduced_trim" else exported["llama"].artifact
    artifact = fake_build(copy_of(source, tmp_path))
    images, prompts = [image_file, None], ["What is in the picture?", "Say something long"]
    expected = Pipeline.load(artifact, provider="cpu").generate_batch(images, prompts, 8)
    pipeline = on_engines(artifact, torch.device("cpu"))
    assert [r.token_ids for r in pipeline.generate_batch(images, prompts, 8)] == [
        r.token_ids for r in expected
    ]
    alone = pipeline.generate(image_file, prompts[0], 8)
    assert alone.token_ids == expected[0].token_ids
    decoder = next(e for e in FakeTensorRT.engines if "past_key_values.0.key" in e.types)
    (context,) = decoder.contexts
    assert context.profiles == [0, 1, 0, 1]  # prefill, decode steps; again for the second generation


def test_the_kv_cache_stays_a_device_tensor_and_logits_come_back_as_numpy(
    exported: dict[str, Exported], tmp_path: Path, image_file: Path, machine: FakeTensorRT
) -> None:
    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path))
    pipeline = on_engines(artifact, torch.device("cpu"))
    prompt_ids, features, _ = pipeline.encode_prompts([image_file], ["Hi"])
    logits, state = pipeline.prefill(prompt_ids, features)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
    assert all(isinstance(v, torch.Tensor) for v in state.cache.values())
    assert pipeline.decoder.fed_back == {n.replace("past_key_values.", "present.") for n in state.cache}
    next_logits = pipeline.decode_one_token(np.array([int(logits.argmax())]), state)
    assert isinstance(next_logits, np.ndarray)


def test_inputs_beyond_the_built_bounds_are_refused(
    exported: dict[str, Exported], tmp_path: Path, machine: FakeTensorRT
) -> None:
    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path), EngineLimits(max_batch=1))
    pipeline = on_engines(artifact, torch.device("cpu"))
    with pytest.raises(RlensError, match=r"built for at most batch 1.*larger --max-batch") as error:
        pipeline.generate_batch([None, None], ["one", "two"], 2)
    assert "\n" not in str(error.value)


def test_provider_tensorrt_opens_the_engines(
    exported: dict[str, Exported],
    tmp_path: Path,
    image_file: Path,
    machine: FakeTensorRT,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rlens.tensorrt import runtime

    monkeypatch.setattr(runtime, "_cuda_device", lambda: torch.device("cpu"))
    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path))
    expected = Pipeline.load(artifact, provider="cpu").generate(image_file, "Hi", 8)
    pipeline = Pipeline.load(artifact, provider="tensorrt")
    assert all(
        isinstance(getattr(pipeline, n), runtime.EngineSession) for n in ("vision", "embedding", "decoder")
    )
    assert pipeline.generate(image_file, "Hi", 8).token_ids == expected.token_ids


# -- rlens engines: (re)building an exported artifact's engines -----------------------------------


def test_engines_command_without_tensorrt_leaves_the_artifact_as_it_was(
    exported: dict[str, Exported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if engines.missing_requirement() is None:
        pytest.skip("this machine has TensorRT and a GPU: tests/test_tensorrt_gpu.py builds engines")
    artifact = copy_of(exported["llama"].artifact, tmp_path)
    before = sorted(p.name for p in artifact.iterdir()), (artifact / "rlens.json").read_text()
    assert rlens_main(["engines", str(artifact)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "need the tensorrt package and an NVIDIA GPU" in err
    assert (sorted(p.name for p in artifact.iterdir()), (artifact / "rlens.json").read_text()) == before


@pytest.mark.parametrize("kind", ["reduced", "int8"])
def test_engines_command_refuses_an_onnxruntime_only_artifact(
    reduced_trim: Path, quantized: dict[str, Path], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # refused on any machine, TensorRT or not: the graphs themselves are the problem
    artifact = reduced_trim if kind == "reduced" else quantized["int8"]
    assert rlens_main(["engines", str(artifact)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export again with `--target tensorrt`" in err
    assert ("the ONNX Runtime track's" if kind == "reduced" else "MatMulNBits") in err
    assert not list(artifact.glob("*.engine"))


def test_a_rebuild_replaces_engines_and_record_together_or_not_at_all(
    exported: dict[str, Exported], tmp_path: Path, machine: FakeTensorRT, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build path with TensorRT's builder stubbed: the second graph fails, then every graph builds."""
    from types import SimpleNamespace

    import rlens.tensorrt.check

    artifact = fake_build(copy_of(exported["llama"].artifact, tmp_path))
    files = lambda: {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()}  # noqa: E731
    before = files()
    monkeypatch.setattr(engines, "missing_requirement", lambda: None)
    monkeypatch.setattr(rlens.tensorrt.check, "check_artifact", lambda *a, **k: SimpleNamespace(ok=True))
    monkeypatch.setattr(machine, "Builder", lambda logger: object(), raising=False)
    built: list[str] = []

    def fail_on_the_second(*args: object) -> bytes:  # _build_one(trt, builder, logger, onnx, name, ...)
        name = args[4]
        if built:
            raise RlensError(f"TensorRT refused the {name} graph")
        built.append(name)
        return f"plan of {name}".encode()

    monkeypatch.setattr(engines, "_build_one", fail_on_the_second)
    assert rlens_main(["engines", str(artifact)]) == 1
    assert files() == before  # old engines and rlens.json as they were, no partial file left

    monkeypatch.setattr(engines, "_build_one", lambda *a: f"plan of {a[4]}".encode())
    assert rlens_main(["engines", str(artifact), "-q", "--max-batch", "3"]) == 0
    record = read_manifest(artifact).tensorrt
    assert record is not None and record.max_batch == 3 and record.version == VERSION
    # bounds not given keep the ones the engines were built with
    assert record.max_context == json.loads(before["rlens.json"])["tensorrt"]["max_context"]
    assert (artifact / "vision.engine").read_bytes() == b"plan of vision"
    assert not [p for p in artifact.iterdir() if p.name.endswith(".partial")]
