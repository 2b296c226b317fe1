"""Run an artifact's TensorRT engines behind the call interface of an ONNX Runtime session.

    rlens.json ``tensorrt`` -> refuse_incompatible (TensorRT release, GPU) -> trt.Runtime
    -> per graph: <graph>.engine -> ICudaEngine -> one execution context (EngineSession)
    run(feeds): the profile the shapes fit -> set_input_shape + set_tensor_address per input
    -> output buffers sized by the context -> execute_async_v3 on the session's stream

Which provider runs what: ``--provider tensorrt`` runs these engines when the manifest has a
``tensorrt`` block (``rlens export --target tensorrt`` built them; ``uses_engines``), and ONNX
Runtime's TensorRT execution provider on the ONNX graphs otherwise. The engines come first because
they were built ahead of time from rlens's own profiles (prefill and decode, bounds recorded in the
manifest): loading takes seconds instead of the execution provider's build on first use, each
decoder call runs kernels tuned for its own shapes, and the KV cache stays on the GPU between
steps. The execution provider stays as the fallback: it needs no build step, and it hands nodes
TensorRT cannot take to CUDA instead of failing.

Engines are not portable: TensorRT runs one only with the release that built it, and only on the
GPU it was built for (the build sets neither version- nor hardware-compatibility flags; NVIDIA
advises the same GPU model, not just the same architecture). So the manifest's record is compared
with this machine before anything is deserialized, and a mismatch is one RlensError line that says
to rebuild, instead of a TensorRT trace or an engine that runs slowly on the wrong GPU.

Buffers are torch CUDA tensors (a CUDA build of torch on the GPU machine): the simplest device
memory Python has. Outputs the next call feeds back (``present.*`` -> ``past_key_values.*``) stay
torch tensors on the GPU, so the KV cache never travels to the host; every other output comes back
as a numpy array, as ONNX Runtime returns it, so the pipeline reads both kinds of session alike.
``tensorrt`` and ``torch`` are imported only when engines are opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlens.errors import RlensError
from rlens.runtime.sessions import FED_BACK, fed_back
from rlens.tensorrt import engines
from rlens.tensorrt.engines import EngineLimits, Profile, profiles_for

if TYPE_CHECKING:
    import torch

    from rlens.manifest import Manifest, TensorInfo, TensorRTInfo

ENGINE_DTYPES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "INT8": "int8",
    "UINT8": "uint8",
}
"""TensorRT ``DataType`` member names -> torch dtype names, for the types rlens graphs carry."""


def uses_engines(manifest: Manifest, provider: str) -> bool:
    """Whether ``provider`` runs rlens's own engines (True) or ONNX Runtime's providers (False)."""
    return provider == "tensorrt" and manifest.tensorrt is not None


def refuse_incompatible(
    info: TensorRTInfo, version: str, gpu: tuple[str, str], artifact_dir: str | Path
) -> None:
    """Raise unless this machine's TensorRT release and GPU are the ones the engines were built for.

    Called before deserializing: TensorRT would refuse another release with a trace, and may run
    an engine on another GPU model slowly or wrongly.
    """
    built = (info.version, info.gpu, info.compute_capability)
    here = (version, *gpu)
    if built == here:
        return
    raise RlensError(
        f"the TensorRT engines in '{artifact_dir}' were built with TensorRT {built[0]} for {built[1]} "
        f"(compute capability {built[2]}), and this machine has TensorRT {here[0]} and {here[1]} "
        f"({here[2]}); TensorRT runs an engine only with the release and GPU it was built for: rebuild "
        f"them here with `{engines.engines_command(Path(artifact_dir))}` (the graphs are enough), or use "
        "--provider cuda"
    )


def select_profile(
    profiles: Sequence[Profile], shapes: Mapping[str, tuple[int, ...]], values: Mapping[str, list[int]]
) -> int | None:
    """Index of the first profile whose shape (and shape-tensor value) ranges hold these inputs.

    The decoder's profiles are disjoint (prefill has no past, decode one new token after a past),
    so the first fit is the only fit; None when the inputs exceed every profile.
    """
    for index, profile in enumerate(profiles):
        fits_shapes = all(_within(shapes.get(n), low, high) for n, (low, _, high) in profile.shapes.items())
        fits_values = all(
            low <= v <= high for n, (low, _, high) in profile.values.items() for v in values.get(n, [])
        )
        if fits_shapes and fits_values:
            return index
    return None


def _within(shape: tuple[int, ...] | None, low: tuple[int, ...], high: tuple[int, ...]) -> bool:
    return (
        shape is not None
        and len(shape) == len(low)
        and all(a <= d <= b for d, a, b in zip(shape, low, high, strict=True))
    )


class Engines:
    """The engines of one artifact on this machine: checked once, then opened graph by graph.

    ``device`` is the CUDA device the buffers live on (default: torch's current one); the tests
    pass a CPU device together with a fake ``tensorrt`` whose engines read host memory.
    """

    def __init__(self, artifact_dir: str | Path, manifest: Manifest, device: torch.device | None = None):
        self.directory = Path(artifact_dir)
        self.manifest = manifest
        info = manifest.tensorrt
        if info is None:
            raise RlensError(
                f"'{self.directory}' has no TensorRT engines; build them on the GPU machine with "
                f"`{engines.engines_command(self.directory)}`"
            )
        self.info = info
        missing = engines.missing_requirement()
        if missing is not None:
            raise RlensError(f"the TensorRT engines in '{self.directory}' need TensorRT and a GPU: {missing}")
        import tensorrt as trt

        gpu = engines.current_gpu()
        assert gpu is not None, "missing_requirement() found a GPU a moment ago"
        refuse_incompatible(info, trt.__version__, gpu, self.directory)
        self.device = device if device is not None else _cuda_device()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # both kept alive by every session: engines need them
        limits = EngineLimits(info.max_batch, info.max_context, info.max_visual_tokens)
        self.profiles = profiles_for(manifest, limits)  # the very profiles the build added, in order

    def bounds(self) -> str:
        i = self.info
        return (
            f"batch {i.max_batch}, {i.max_context} tokens of context and {i.max_visual_tokens} visual "
            "tokens per image"
        )

    def open(self, name: str) -> EngineSession:
        """Deserialize ``<name>.engine`` and give it a session; every failure says to rebuild."""
        rebuild = f"rebuild them on this machine: `{engines.engines_command(self.directory)}`"
        file = self.info.engines.get(name)
        if file is None or not (self.directory / file).is_file():
            raise RlensError(
                f"the TensorRT engine of graph '{name}' is missing in '{self.directory}'; {rebuild}"
            )
        engine = self.runtime.deserialize_cuda_engine((self.directory / file).read_bytes())
        if engine is None:
            raise RlensError(
                f"TensorRT could not load '{self.directory / file}' (its log above says why); {rebuild}"
            )
        profiles = self.profiles[name]
        expected, recorded = [p.name for p in profiles], self.info.profiles.get(name, [])
        if recorded != expected:
            raise RlensError(
                f"rlens.json records profiles {recorded} for '{file}', this rlens builds {expected}; "
                f"{rebuild}"
            )
        if engine.num_optimization_profiles != len(profiles):
            raise RlensError(
                f"'{file}' holds {engine.num_optimization_profiles} optimization profile(s), rlens.json "
                f"records {len(recorded)}; {rebuild}"
            )
        graph = self.manifest.graphs[name]
        return EngineSession(name, engine, profiles, graph.inputs, graph.outputs, self.device, self)


class EngineSession:
    """One engine with the call interface of an ``onnxruntime.InferenceSession``: ``run``, IO lists.

    One execution context serves every profile: it switches profile only when a call needs another
    one (a generation switches twice: to decode after the prefill, back for the next prompt).
    """

    def __init__(
        self,
        name: str,
        engine: Any,
        profiles: list[Profile],
        inputs: list[TensorInfo],
        outputs: list[TensorInfo],
        device: torch.device,
        owner: Engines,
    ) -> None:
        import torch

        self.name, self.engine, self.profiles = name, engine, profiles
        self.device, self.owner = device, owner  # the owner holds the TensorRT runtime the engine came from
        self.inputs, self.outputs = inputs, outputs
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RlensError(
                f"TensorRT could not create a context for the {name} engine: is the GPU out of memory?"
            )
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.profile: int | None = None
        self.fed_back = fed_back({t.name for t in inputs}, [t.name for t in outputs])
        # TensorRT wants an address even for an empty tensor (the first call's KV cache), torch gives 0
        self.placeholder = torch.empty(256, dtype=torch.uint8, device=device)
        self.dtypes = {t.name: _dtype(engine, name, t.name) for t in [*inputs, *outputs]}

    def get_inputs(self) -> list[TensorInfo]:
        """The graph's inputs from the manifest (``name``, ``dtype``, ``shape``), as ORT's NodeArgs."""
        return self.inputs

    def get_outputs(self) -> list[TensorInfo]:
        return self.outputs

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list[Any]:
        """Run on numpy arrays or torch tensors; outputs as numpy, fed-back ones as device tensors."""
        import torch

        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            outputs, keep = self._execute(feeds)
        if self.stream is not None:
            self.stream.synchronize()  # the host copies below, and ``keep``'s buffers, need the run done
        del keep
        names = output_names or [t.name for t in self.outputs]
        return [outputs[n] if n in self.fed_back else _to_numpy(outputs[n]) for n in names]

    def _execute(self, feeds: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """Enqueue one run on the current stream; returns the outputs and the inputs to keep alive."""
        import torch

        missing = [t.name for t in self.inputs if t.name not in feeds]
        if missing:
            raise RlensError(f"the {self.name} engine needs input(s) {', '.join(missing)}")
        self._use_profile(feeds)
        keep: list[Any] = []
        for tensor in self.inputs:
            name, value = tensor.name, feeds[tensor.name]
            if self.engine.get_tensor_location(name).name == "HOST":  # a shape tensor: read on the host
                buffer: Any = np.asarray(_host(value), dtype=self.dtypes[name], order="C")
                address = buffer.ctypes.data
            else:
                buffer = _device(value, getattr(torch, self.dtypes[name]), self.device)
                address = buffer.data_ptr() or self.placeholder.data_ptr()
            keep.append(buffer)
            self.context.set_tensor_address(name, address)
            if not self.context.set_input_shape(name, tuple(buffer.shape)):
                raise RlensError(
                    f"the {self.name} engine refused input '{name}' of shape {tuple(buffer.shape)}"
                )
        outputs = {}
        for tensor in self.outputs:
            shape = tuple(self.context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise RlensError(
                    f"the {self.name} engine's output '{tensor.name}' has a size only the data decides "
                    f"({shape}); re-export the model with this rlens"
                )
            out = torch.empty(shape, dtype=getattr(torch, self.dtypes[tensor.name]), device=self.device)
            self.context.set_tensor_address(tensor.name, out.data_ptr() or self.placeholder.data_ptr())
            outputs[tensor.name] = out
        handle = self.stream.cuda_stream if self.stream is not None else 0
        if not self.context.execute_async_v3(handle):
            raise RlensError(f"TensorRT could not run the {self.name} engine (its log above says why)")
        return outputs, keep

    def _use_profile(self, feeds: Mapping[str, Any]) -> None:
        """Switch the context to the profile these inputs fit; refuse inputs beyond the engine's bounds."""
        shapes = {name: tuple(np.shape(value)) for name, value in feeds.items()}
        values = {
            name: np.asarray(_host(feeds[name])).reshape(-1).tolist()
            for profile in self.profiles
            for name in profile.values
            if name in feeds
        }
        index = select_profile(self.profiles, shapes, values)
        if index is None:
            cache = FED_BACK[1]  # the KV cache's shapes follow the others: leave them out
            summary = ", ".join(f"{n} {list(s)}" for n, s in shapes.items() if not n.startswith(cache))
            raise RlensError(
                f"the {self.name} engine was built for at most {self.owner.bounds()}, and this call "
                f"({summary}) exceeds that; rebuild them with "
                f"`{engines.engines_command(self.owner.directory)}` and larger --max-batch, --max-context or "
                "--max-visual-tokens"
            )
        if index != self.profile:
            handle = self.stream.cuda_stream if self.stream is not None else 0
            if not self.context.set_optimization_profile_async(index, handle):
                raise RlensError(f"TensorRT could not switch the {self.name} engine to profile {index}")
            self.profile = index


def _dtype(engine: Any, graph: str, name: str) -> str:
    """The torch (and, but for bfloat16, numpy) name of an engine tensor's type."""
    kind = engine.get_tensor_dtype(name).name
    if kind not in ENGINE_DTYPES:
        raise RlensError(f"the {graph} engine's tensor '{name}' is {kind}, which rlens cannot hold")
    return ENGINE_DTYPES[kind]


def _host(value: Any) -> np.ndarray:
    """A feed as a host array: shape-tensor values and profile checks read it on the CPU."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _device(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A feed as a contiguous tensor of the engine's type on ``device`` (device tensors are not copied)."""
    import torch

    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, order="C"))
    assert tensor.is_floating_point() == dtype.is_floating_point, (
        f"a {tensor.dtype} feed for a {dtype} input: the graph and the pipeline disagree"
    )
    return tensor.to(device=device, dtype=dtype).contiguous()


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """An output as ONNX Runtime would return it (numpy has no bfloat16: those become float32)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _cuda_device() -> torch.device:
    """torch's current CUDA device; a torch without CUDA cannot hold the engines' buffers."""
    import torch

    if not torch.cuda.is_available():
        raise RlensError(
            f"the TensorRT engines keep their buffers in torch CUDA tensors and this torch "
            f"({torch.__version__}) has no CUDA device; install a CUDA build of torch (see the README)"
        )
    return torch.device("cuda", torch.cuda.current_device())
