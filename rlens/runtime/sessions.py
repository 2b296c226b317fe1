"""Sessions for the graphs of an artifact, on the provider the user picked.

``cpu`` and ``cuda`` are ONNX Runtime's providers. ``tensorrt`` runs the TensorRT engines
``rlens export --target tensorrt`` built beside the graphs when the manifest records them
(``rlens.tensorrt.runtime``: prebuilt profiles, the KV cache kept on the GPU), and ONNX Runtime's
TensorRT execution provider on the ONNX graphs when it does not.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from rlens.errors import RlensError

if TYPE_CHECKING:
    from rlens.manifest import Manifest

PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def execution_providers(provider: str) -> list[str]:
    """The ORT provider list for ``cpu``, ``cuda`` or ``tensorrt``, refusing what this build lacks."""
    if provider not in PROVIDERS:
        raise RlensError(f"unknown provider '{provider}'; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise RlensError(
            f"provider '{provider}' needs {wanted[0]}, which this onnxruntime lacks "
            f"(it has {', '.join(available)}); install the GPU extra: see the README"
        )
    return [p for p in wanted if p in available]


def open_session(path: Path, provider: str, threads: int = 0) -> ort.InferenceSession:
    """One inference session; a missing or corrupt graph becomes a one-line RlensError."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=execution_providers(provider))
    except RlensError:
        raise
    except Exception as e:  # ORT raises its own exception types for unreadable models
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RlensError(f"cannot load graph '{path}': {reason[:300]}; re-export the model") from e


def graph_opener(artifact_dir: Path, manifest: Manifest, provider: str) -> Callable[[str], Any]:
    """Open the artifact's graphs by name on ``provider``: engines where they were built, else ORT."""
    from rlens.tensorrt.runtime import Engines, uses_engines

    if uses_engines(manifest, provider):
        return Engines(artifact_dir, manifest).open  # refuses engines built for another release or GPU
    return lambda name: open_session(artifact_dir / manifest.graphs[name].file, provider)
