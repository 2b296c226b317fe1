"""TensorRT engines for an artifact: one serialized engine per graph, beside the graph.

    rlens.json -> optimization profiles (max batch, max context, max visual tokens)
    -> static check (rlens.tensorrt.check) -> per graph: ONNX parser -> strongly typed network
    -> builder config (profiles, shared timing cache) -> <graph>.engine

Networks are strongly typed: the precision is the graph's own (TensorRT 10.12 deprecated the
builder's precision flags and TensorRT 11 removed them), so an fp16 engine comes from an fp16 graph,
and TF32 is switched off so that a float32 graph computes in float32.
The decoder gets two profiles, prefill (no past, a prompt of up to max context tokens) and decode
(one token after up to max context - 1), so each is tuned for its own shapes.

``tensorrt`` is imported only inside ``build_engines``: importing this module, computing profiles
and testing them need neither the package nor a GPU. Without them ``build_engines`` stops with an
RlensError that says what is missing; the ONNX graphs are untouched.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlens.errors import RlensError
from rlens.manifest import TensorRTInfo, write_manifest
from rlens.precision import is_quantized

if TYPE_CHECKING:
    from rlens.manifest import Manifest, TensorInfo

log = logging.getLogger("rlens")

ENGINE_SUFFIX = ".engine"
TIMING_CACHE = "timing.cache"
"""Kernel timings shared by the graphs' builds and kept for the next build on the same GPU."""

Range3 = tuple[int, int, int]
"""(min, opt, max) of one dimension or one shape-tensor value."""


@dataclass(frozen=True)
class EngineLimits:
    """The largest inputs the engines take: TensorRT tunes kernels for a range of shapes, not any shape."""

    max_batch: int = 1
    max_context: int | None = None
    """Prompt plus generated tokens; default the model's ``max_context``."""
    max_visual_tokens: int | None = None
    """Image-feature rows per image; default the vision graph's (TRIM: its V + 1 maximum)."""

    def flags(self) -> str:
        """These bounds as ``rlens engines`` options (the defaults left out)."""
        parts = [f"--max-batch {self.max_batch}"] if self.max_batch != 1 else []
        if self.max_context is not None:
            parts.append(f"--max-context {self.max_context}")
        if self.max_visual_tokens is not None:
            parts.append(f"--max-visual-tokens {self.max_visual_tokens}")
        return "".join(f" {p}" for p in parts)


def engines_command(directory: Path, limits: EngineLimits | None = None) -> str:
    """The command that builds this artifact's engines, ready to paste (the path shell-quoted)."""
    return f"rlens engines {shlex.quote(str(directory))}{limits.flags() if limits else ''}"


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) shapes per input, and values for shape-tensor inputs."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    values: dict[str, Range3] = field(default_factory=dict)
    """Per-element value range of inputs TensorRT may take as shape tensors (their values set sizes)."""


# -- profiles (pure: no tensorrt needed) ----------------------------------------------------------


def resolve_limits(manifest: Manifest, limits: EngineLimits = EngineLimits()) -> EngineLimits:
    """``limits`` with the manifest's defaults filled in: every bound a number, as the manifest records it."""
    resolved = EngineLimits(
        limits.max_batch,
        limits.max_context or manifest.model.max_context,
        limits.max_visual_tokens
        or (manifest.trim.max_tokens if manifest.trim is not None else manifest.model.num_visual_tokens),
    )
    assert resolved.max_context is not None and resolved.max_visual_tokens is not None
    if resolved.max_batch < 1 or resolved.max_context < 2 or resolved.max_visual_tokens < 1:
        raise RlensError(
            f"TensorRT engines need max batch >= 1, max context >= 2 and max visual tokens >= 1, not "
            f"{resolved.max_batch}, {resolved.max_context} and {resolved.max_visual_tokens}"
        )
    return resolved


def profiles_for(manifest: Manifest, limits: EngineLimits = EngineLimits()) -> dict[str, list[Profile]]:
    """The optimization profiles of every graph, from the manifest's IO and ``limits``."""
    resolved = resolve_limits(manifest, limits)
    batch, context, rows = resolved.max_batch, resolved.max_context, resolved.max_visual_tokens
    assert context is not None and rows is not None
    prompt = min(context, rows + 64)  # the shape kernels are tuned for: one image and a question
    clip = manifest.trim.clip_max_length if manifest.trim is not None else 77
    common: dict[str, Range3] = {
        "batch": (1, 1, batch),
        "num_image_tokens": (0, rows, batch * rows),
        "clip_sequence": (1, min(16, clip), clip),
    }
    start = min(8, context - 1)  # a system prompt's length
    prefill = {
        **common,
        "sequence": (1, prompt, context),
        "past_sequence": (0, 0, 0),
        "visual_start": (0, start, context - 1),  # the TensorRT track's span marker [start, width]
        "visual_width": (0, rows, rows),
    }
    prefill["total_sequence"] = prefill["sequence"]
    past = min(prompt, context - 1)
    decode = {
        **common,
        "sequence": (1, 1, 1),
        "past_sequence": (1, past, context - 1),
        "total_sequence": (2, past + 1, context),
        "visual_start": (0, 0, context - 1),
        "visual_width": (0, 0, rows),
    }
    # an ORT-track reduced decoder's span inputs: where the image starts, each row's visual length
    span_prefill: dict[str, Range3] = {
        "visual_start": (0, start, context - 1),
        "visual_lengths": (0, rows, rows),
    }
    span_decode: dict[str, Range3] = {"visual_start": (0, 0, context - 1), "visual_lengths": (0, 0, rows)}
    profiles: dict[str, list[Profile]] = {}
    for name, graph in manifest.graphs.items():
        if name == "decoder":
            profiles[name] = [
                _profile("prefill", name, graph.inputs, prefill, span_prefill),
                _profile("decode", name, graph.inputs, decode, span_decode),
            ]
        else:
            profiles[name] = [_profile("all", name, graph.inputs, prefill, {})]
    return profiles


def _profile(
    profile: str, graph: str, inputs: list[TensorInfo], dims: dict[str, Range3], values: dict[str, Range3]
) -> Profile:
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for tensor in inputs:
        ranges: list[Range3] = []
        for d in tensor.shape:
            if isinstance(d, int):
                ranges.append((d, d, d))
            elif d in dims:
                ranges.append(dims[d])
            else:
                raise RlensError(
                    f"{graph} input '{tensor.name}' has a dynamic axis '{d}' rlens has no engine bound for; "
                    "re-export the model with this rlens"
                )
        low, opt, high = (tuple(r[i] for r in ranges) for i in range(3))
        shapes[tensor.name] = (low, opt, high)
    names = {t.name for t in inputs}
    return Profile(profile, shapes, {k: v for k, v in values.items() if k in names})


# -- building (needs tensorrt and a GPU) ----------------------------------------------------------


def missing_requirement() -> str | None:
    """Why engines cannot be built here (no tensorrt package, no NVIDIA GPU), or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install -e '.[gpu]')"
    if current_gpu() is None:
        return "no NVIDIA GPU is visible (nvidia-smi finds none)"
    return None


def refuse_onnxruntime_track(manifest: Manifest, directory: Path) -> None:
    """Refuse an artifact exported for ONNX Runtime only: engines cannot be built from its graphs.

    Its reduced decoder sizes the visual span from input values (``visual_start``), where TensorRT
    needs sizes from shapes, and its int8/int4 weights are ONNX Runtime's ``MatMulNBits``.
    """
    over = shlex.quote(str(directory))
    again = f"export again with `--target tensorrt` (into a new directory, or over {over})"
    if is_quantized(manifest.precision):
        raise RlensError(
            f"'{directory}' holds {manifest.precision} graphs (ONNX Runtime's MatMulNBits), which TensorRT "
            f"cannot build; {again} at fp32 or fp16"
        )
    if any(t.name == "visual_start" for t in manifest.graphs["decoder"].inputs):
        raise RlensError(
            f"the reduced decoder in '{directory}' is the ONNX Runtime track's: it reads the visual span "
            f"from input values, and TensorRT sizes buffers from shapes; {again}"
        )


def build_engines(
    artifact_dir: str | Path,
    manifest: Manifest,
    limits: EngineLimits = EngineLimits(),
) -> TensorRTInfo:
    """Build ``<graph>.engine`` for every graph of the artifact; the timing cache is reused and updated.

    Returns the manifest's record of them: the TensorRT release and GPU they run on, and the bounds
    their profiles take.

    The static check runs first, so a graph TensorRT's parser would refuse stops the build with the
    check's first problem instead of a parser trace. Raises RlensError when tensorrt or a GPU is
    missing, when a graph fails the check, or when TensorRT refuses a graph or a profile.
    """
    from rlens.tensorrt.check import check_artifact
    from rlens.tensorrt.support import parse_target

    directory = Path(artifact_dir)
    refuse_onnxruntime_track(manifest, directory)
    missing = missing_requirement()
    if missing is not None:
        raise RlensError(
            f"TensorRT engines need the tensorrt package and an NVIDIA GPU: {missing}. The ONNX graphs "
            f"in '{directory}' are complete; build the engines where both are: "
            f"`{engines_command(directory, limits)}`"
        )
    import tensorrt as trt

    report = check_artifact(directory, parse_target(_release(trt.__version__)))
    if not report.ok:
        problems = report.problems
        raise RlensError(
            f"{len(problems)} graph problem(s) for TensorRT {report.target.name}, first: "
            f"{problems[0].line()} (run `rlens check --tensorrt {directory}`)"
        )
    gpu = current_gpu()
    assert gpu is not None, "missing_requirement() found a GPU a moment ago"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise RlensError("TensorRT could not create a builder: is the NVIDIA driver loaded?")
    profiles = profiles_for(manifest, limits)
    cache_path = directory / TIMING_CACHE
    engines, partials = {}, []
    try:
        for name, graph in manifest.graphs.items():
            log.info("building %s%s", name, ENGINE_SUFFIX)
            serialized = _build_one(
                trt, builder, logger, directory / graph.file, name, profiles[name], cache_path
            )
            engine = f"{name}{ENGINE_SUFFIX}"
            partials.append(directory / f".{engine}.partial")
            partials[-1].write_bytes(memoryview(serialized))
            engines[name] = engine
    except BaseException:  # engines a rebuild already had stay as they were, matching rlens.json
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    # between the renames old and new engines sit side by side: record none until the caller records
    # the new ones, so a crash here leaves "no engines" (rebuild) rather than a mismatched record
    write_manifest(replace(manifest, tensorrt=None), directory)
    for partial, engine in zip(partials, engines.values(), strict=True):
        partial.replace(directory / engine)
    resolved = resolve_limits(manifest, limits)
    assert resolved.max_context is not None and resolved.max_visual_tokens is not None
    return TensorRTInfo(
        version=trt.__version__,
        gpu=gpu[0],
        compute_capability=gpu[1],
        engines=engines,
        profiles={name: [p.name for p in ps] for name, ps in profiles.items()},
        max_batch=resolved.max_batch,
        max_context=resolved.max_context,
        max_visual_tokens=resolved.max_visual_tokens,
        timing_cache=TIMING_CACHE,
    )


def _build_one(
    trt: Any, builder: Any, logger: Any, onnx_path: Path, name: str, profiles: list[Profile], cache_path: Path
) -> Any:
    """Parse one graph into a strongly typed network and build its serialized engine."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads <graph>.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RlensError(f"TensorRT's ONNX parser refused {onnx_path.name}: {errors or 'no reason given'}")
    config = builder.create_builder_config()
    # float32 in the graph means float32: TF32 (on by default) would round matmul inputs to 10-bit
    # mantissas behind the graph's back; the fast track is an fp16/bf16 graph, not a builder flag
    config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for profile in profiles:
        config.add_optimization_profile(_trt_profile(builder, name, profile, inputs))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RlensError(f"TensorRT could not build an engine for {onnx_path.name} (its log above says why)")
    partial = cache_path.with_name(f".{cache_path.name}.partial")
    partial.write_bytes(memoryview(config.get_timing_cache().serialize()))
    partial.replace(cache_path)
    return serialized


def _trt_profile(builder: Any, graph: str, profile: Profile, inputs: dict[str, Any]) -> Any:
    """``profile`` as a TensorRT optimization profile; shape-tensor inputs get value ranges."""
    result = builder.create_optimization_profile()
    for name, tensor in inputs.items():
        if name not in profile.shapes:
            raise RlensError(f"{graph}: TensorRT sees an input '{name}' the manifest does not list")
        low, opt, high = profile.shapes[name]
        if tensor.is_shape_tensor:
            if name not in profile.values:
                raise RlensError(f"{graph}: input '{name}' sets tensor sizes and rlens knows no range for it")
            if low != high:
                raise RlensError(
                    f"{graph}: input '{name}' sets tensor sizes (a TensorRT shape tensor) but its length "
                    f"follows the batch ({low} to {high}); TensorRT needs shape tensors of fixed length: "
                    "build with max batch 1"
                )
            count = 1
            for d in low:
                count *= d
            v_low, v_opt, v_high = profile.values[name]
            result.set_shape_input(name, [v_low] * count, [v_opt] * count, [v_high] * count)
        result.set_shape(name, low, opt, high)
    return result


def _release(version: str) -> str:
    """``"10.8.0.43"`` -> ``"10.8"``: the check's rules change with minor versions only."""
    return ".".join(version.split(".")[:2])


def current_gpu() -> tuple[str, str] | None:
    """(name, compute capability) of the first NVIDIA GPU, from nvidia-smi; None when there is none.

    The one GPU query of the TensorRT track: the build records its answer in the manifest and the
    runtime (``rlens.tensorrt.runtime``) compares it with the same query on the machine it runs on,
    so both sides spell the name and the capability alike.
    """
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    line = next((line for line in out.splitlines() if line.strip()), "")
    name, _, capability = line.partition(",")
    return (name.strip(), capability.strip()) if name.strip() else None
