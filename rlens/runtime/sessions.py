"""ONNX Runtime sessions for the graphs of an artifact, on the provider the user picked."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from rlens.errors import RlensError

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
