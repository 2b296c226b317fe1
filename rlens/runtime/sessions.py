"""Sessions for the graphs of an artifact, on the provider the user picked.

``cpu`` and ``cuda`` are ONNX Runtime's providers. ``tensorrt`` runs the TensorRT engines
``rlens export --target tensorrt`` built beside the graphs when the manifest records them
(``rlens.tensorrt.runtime``: prebuilt profiles, the KV cache kept on the GPU), and ONNX Runtime's
TensorRT execution provider on the ONNX graphs when it does not.

On a GPU provider every ORT session is wrapped in ``DeviceSession``: without IO binding ORT copies
each output back to the host and each input to the device on every ``run``, so the KV cache would
cross PCIe twice per generated token (ORT, "I/O Binding"). With it, the ``present.*`` outputs stay
on the GPU as ``OrtValue``s and go straight back in as the next step's ``past_key_values.*``. The
other outputs come to the host: the logits the sampler reads, TRIM's counts, and the tensors passed
from one graph to the next (image features, input embeddings), which the pipeline lays out in numpy;
at LLaVA-1.5-7B geometry those are about 10 MB each way per prefill and 16 KB per decode step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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
    providers = execution_providers(provider)  # refuses a provider this onnxruntime lacks, first
    if provider != "cpu":
        _preload_cuda_libraries()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for unreadable models
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RlensError(f"cannot load graph '{path}': {reason[:300]}; re-export the model") from e


def graph_opener(artifact_dir: Path, manifest: Manifest, provider: str) -> Callable[[str], Any]:
    """Open the artifact's graphs by name on ``provider``: engines where they were built, else ORT."""
    from rlens.tensorrt.runtime import Engines, uses_engines

    if uses_engines(manifest, provider):
        return Engines(artifact_dir, manifest).open  # refuses engines built for another release or GPU
    if provider == "cpu":
        return lambda name: open_session(artifact_dir / manifest.graphs[name].file, provider)
    return lambda name: DeviceSession(open_session(artifact_dir / manifest.graphs[name].file, provider))


FED_BACK = ("present.", "past_key_values.")
"""An output named ``present.X`` is the next call's input ``past_key_values.X``: it stays on the GPU."""


def fed_back(input_names: set[str], output_names: list[str]) -> set[str]:
    """The outputs the next call takes back as inputs (the KV cache): those a GPU session keeps there."""
    return {name for name in output_names if name.replace(*FED_BACK, 1) in input_names}


class DeviceSession:
    """An ORT session on a GPU provider, run through IO binding: the KV cache never leaves the device.

    Same call interface as ``InferenceSession`` (``run``, ``get_inputs``, ``get_outputs``). Feeds are
    numpy arrays (copied to the device once per call) or ``OrtValue``s already there; fed-back
    outputs come back as ``OrtValue``s on ``device`` (ORT's device name: ``cuda``, or ``cpu`` for
    the tests without a GPU), every other output as numpy.
    """

    def __init__(self, session: ort.InferenceSession, device: str = "cuda", device_id: int = 0) -> None:
        self.session, self.device, self.device_id = session, device, device_id
        self.fed_back = fed_back(
            {i.name for i in session.get_inputs()}, [o.name for o in session.get_outputs()]
        )

    def get_inputs(self) -> list[Any]:
        return self.session.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self.session.get_outputs()

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.asarray(value, order="C"))  # ascontiguousarray makes 0-d 1-d
        names = output_names or [o.name for o in self.session.get_outputs()]
        for name in names:
            binding.bind_output(name, self.device if name in self.fed_back else "cpu", self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return [v if n in self.fed_back else v.numpy() for n, v in zip(names, values, strict=True)]


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the ``nvidia-*`` pip packages (``onnxruntime-gpu[cuda,cudnn]``).

    Those packages are not on the loader's path; ``onnxruntime.preload_dlls`` (ORT 1.21+) finds them
    in site-packages and loads them before the CUDA provider needs them (ORT docs, CUDA provider:
    "Preload DLLs"). Older ORTs, and system-wide CUDA installs, need nothing.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()
