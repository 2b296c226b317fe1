"""The runtime on its own: no torch, no transformers; manifest parsing; sampling filters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Exported
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rlens.errors import RlensError
from rlens.manifest import read_manifest
from rlens.runtime.sampling import SamplingOptions, filter_logits


def test_runtime_imports_neither_torch_nor_transformers(
    exported: dict[str, Exported], image_file: Path
) -> None:
    # an application that embeds the runtime has none of these installed: make importing them fail
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "onnx_ir", "onnxscript", "tqdm"):
            sys.modules[name] = None
        from rlens.runtime.pipeline import Pipeline
        result = Pipeline.load({str(exported["mistral"].artifact)!r}).generate({str(image_file)!r}, "Hi", 4)
        assert result.token_ids, result
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")
                       and sys.modules[m] is not None)
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the runtime imported {out.stdout.strip()}"


def test_manifest_round_trips_and_rejects_unknown_keys(exported: dict[str, Exported], tmp_path: Path) -> None:
    source = exported["qwen2"].artifact
    manifest = read_manifest(source)
    assert manifest.graphs["decoder"].inputs[0].name == "inputs_embeds"
    assert [t.name for t in manifest.graphs["decoder"].outputs[:3]] == [
        "logits",
        "present.0.key",
        "present.0.value",
    ]
    assert manifest.validation is not None and manifest.validation.prefill_logits_max_diff < 1e-4

    data = json.loads((source / "rlens.json").read_text())
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    data["model"]["colour"] = "blue"
    (tmp_path / "rlens.json").write_text(json.dumps(data))
    with pytest.raises(RlensError, match=r"model: unknown key\(s\) colour"):
        read_manifest(tmp_path)
    del data["model"]["colour"], data["generation"]["eos_token_ids"]
    (tmp_path / "rlens.json").write_text(json.dumps(data))
    with pytest.raises(RlensError, match="missing key"):
        read_manifest(tmp_path)
    (tmp_path / "rlens.json").write_text("{not json")
    with pytest.raises(RlensError, match="not valid JSON"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8), (3, 0.5), (0, 0.05)])
def test_filters_match_transformers_warpers(top_k: int, top_p: float) -> None:
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    ours = filter_logits(logits, SamplingOptions(do_sample=True, top_k=top_k, top_p=top_p))
    theirs = torch.from_numpy(logits.copy())
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    np.testing.assert_array_equal(np.isinf(ours), torch.isinf(theirs).numpy())


def test_gpu_providers_are_refused_clearly_without_the_gpu_build() -> None:
    import onnxruntime as ort

    from rlens.runtime.sessions import execution_providers

    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(RlensError, match="unknown provider"):
        execution_providers("tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal path cannot be exercised")
    with pytest.raises(RlensError, match="install the GPU extra"):
        execution_providers("cuda")
    with pytest.raises(RlensError, match="TensorrtExecutionProvider"):
        execution_providers("tensorrt")
