"""``rlens.json``: the one file that describes an exported pipeline.

The exporter writes it (``write_manifest``, nowhere else) and the runtime reads nothing else to
know what to run: which graphs, their inputs and outputs, the model geometry, the tokenizer and
image-processor files, how a prompt is laid out, and the generation defaults. It is parsed into
typed dataclasses with defaults; unknown keys and another schema version are refused, so a stale
or hand-edited manifest fails loudly instead of running the wrong thing.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlens.errors import RlensError
from rlens.reductions import Reductions
from rlens.runtime.preprocess import ImageProcessorConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "rlens.json"


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: ONNX element type name and shape (ints, or names of dynamic axes)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class GraphInfo:
    """One ONNX graph of the pipeline and the files it is made of."""

    file: str
    data_files: list[str] = field(default_factory=list)
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """Geometry the runtime needs to size the KV cache and lay out prompts."""

    architecture: str
    text_backbone: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    image_size: int
    num_visual_tokens: int
    image_token_id: int


@dataclass(frozen=True)
class PromptInfo:
    """How a user's question becomes the token sequence the embedding graph reads.

    The checkpoint's chat template is rendered at export time around a placeholder, so the runtime
    needs no template engine: a prompt is ``prefix + question + suffix``. ``image_prefix`` and
    ``image_suffix`` are used when the question does not place ``image_token`` itself.
    """

    image_token: str
    image_prefix: str
    image_suffix: str
    text_prefix: str
    text_suffix: str
    add_special_tokens: bool = True
    chat_template: bool = True


@dataclass(frozen=True)
class TokenizerInfo:
    file: str = "tokenizer.json"
    bos_token_id: int | None = None
    pad_token_id: int = 0


@dataclass(frozen=True)
class GenerationInfo:
    eos_token_ids: list[int]
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class ValidationInfo:
    """What ``rlens export`` measured against the PyTorch model after writing the graphs."""

    atol: float
    image_features_max_diff: float
    prefill_logits_max_diff: float
    decode_logits_max_diff: float
    trim_features_max_diff: float | None = None
    trim_tokens: int | None = None
    """How many visual tokens TRIM keeps of the sample (a noise image; real images differ)."""


@dataclass(frozen=True)
class TrimInfo:
    """TRIM: the ``trim`` graph replaces ``vision`` and keeps the visual tokens the instruction needs.

    ``trim.onnx`` returns ``max_tokens`` rows (V + 1) and a per-image count; the runtime keeps the first
    ``count`` rows. The instruction is tokenized with CLIP's own tokenizer, copied beside the graphs.
    """

    mode: str  # "iqr" | "ratio"
    select: str  # "high" (the paper) | "low" (the public code)
    max_tokens: int
    ratio: float | None = None
    clip_tokenizer: str = "clip/tokenizer.json"
    clip_max_length: int = 77
    clip_pad_token_id: int = 0


@dataclass(frozen=True)
class CostInfo:
    """Prefill FLOPs of a typical prompt (``rlens.flops``), unreduced and as exported."""

    prompt_tokens: int
    visual_tokens: int
    unreduced: dict[str, int]
    reduced: dict[str, int]
    reduced_visual_tokens: int | None = None
    """Visual tokens the exported pipeline keeps of the sample (TRIM), when fewer than ``visual_tokens``."""


@dataclass(frozen=True)
class TensorRTInfo:
    """Engines of the TensorRT track (``rlens export --target tensorrt``), one per graph.

    An engine runs only with the TensorRT release and the GPU generation it was built for, so both
    are recorded for the runtime to compare before it deserializes anything; the bounds are the
    largest inputs the engines' optimization profiles accept.
    """

    version: str
    gpu: str
    compute_capability: str
    engines: dict[str, str]
    profiles: dict[str, list[str]]
    max_batch: int
    max_context: int
    max_visual_tokens: int
    timing_cache: str = "timing.cache"


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    rlens_version: str
    model: ModelInfo
    graphs: dict[str, GraphInfo]
    tokenizer: TokenizerInfo
    prompt: PromptInfo
    image_processor: ImageProcessorConfig
    generation: GenerationInfo
    reductions: Reductions = field(default_factory=Reductions)
    precision: str = "fp32"
    """Weights of the decoder's MatMuls: ``fp32``, or ``int8`` / ``int4`` MatMulNBits blocks
    (``rlens.graphs.quantize``). The other graphs are fp32 whatever this says."""
    trim: TrimInfo | None = None
    cost: CostInfo | None = None
    source: dict[str, str] = field(default_factory=dict)
    validation: ValidationInfo | None = None
    tensorrt: TensorRTInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse(cls: Any, value: Any, where: str) -> Any:
    """Build ``cls`` (a dataclass, or a container type of them) from JSON, rejecting unknown keys."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(cls)
        if value is None and type(None) in options:
            return None
        present = [o for o in options if o is not type(None)]
        if len(present) == 1:  # X | None: X's own error says what is wrong
            return _parse(present[0], value, where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse(option, value, where)
            except RlensError:
                continue
        raise RlensError(f"{where}: {value!r} is not a valid value")
    if origin is list:
        if not isinstance(value, list):
            raise RlensError(f"{where}: expected a list")
        (item,) = typing.get_args(cls)
        return [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(cls)
        if not isinstance(value, list) or (... not in items and len(value) != len(items)):
            raise RlensError(f"{where}: expected a list of {len(items)}")
        return tuple(_parse(items[0 if ... in items else i], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RlensError(f"{where}: expected an object")
        _, item = typing.get_args(cls)
        return {k: _parse(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise RlensError(f"{where}: expected an object")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise RlensError(f"{where}: unknown key(s) {', '.join(unknown)}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(value))
        if missing:
            raise RlensError(f"{where}: missing key(s) {', '.join(missing)}")
        return cls(**{k: _parse(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if cls is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if cls in (int, float, str, bool) and not (
        isinstance(value, cls) and (cls is bool or not isinstance(value, bool))
    ):
        raise RlensError(f"{where}: expected {cls.__name__}, got {value!r}")
    return value


def manifest_from_dict(data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise RlensError(
            f"{where} has schema version {version}, this rlens reads version {SCHEMA_VERSION}; "
            "re-export the model with this rlens"
        )
    return _parse(Manifest, data, where)


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """Parse ``artifact_dir/rlens.json``; every problem is one RlensError line saying what to do."""
    directory = Path(artifact_dir)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise RlensError(f"artifact directory '{directory}' does not exist; create one with `rlens export`")
    if not path.is_file():
        raise RlensError(
            f"'{directory}' has no {MANIFEST_NAME}; it is not an rlens artifact (run `rlens export`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RlensError(f"'{path}' is not valid JSON ({e}); re-export the model") from e
    manifest = manifest_from_dict(data, str(path))
    for name, graph in manifest.graphs.items():
        for file in [graph.file, *graph.data_files]:
            if not (directory / file).is_file():
                raise RlensError(f"graph '{name}' file '{directory / file}' is missing; re-export the model")
    return manifest


def write_manifest(manifest: Manifest, artifact_dir: Path) -> Path:
    """The only writer of ``rlens.json``."""
    path = artifact_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path
