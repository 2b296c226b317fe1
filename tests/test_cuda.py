"""``--provider cuda``: ONNX Runtime's CUDA provider through IO binding, the KV cache kept on the GPU.

The plumbing (``DeviceSession``: numpy feeds bound in, ``present.*`` kept as ``OrtValue``s and fed
back as ``past_key_values.*``) runs on every machine with ORT's CPU device standing in for the GPU.
On a machine whose onnxruntime has the CUDA provider (``onnxruntime-gpu``, see the README), every
kind of artifact rlens writes answers on ``cuda`` with the CPU pipeline's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import REDUCTION_FLAGS, Exported

from rlens.cli.main import main as rlens_main
from rlens.precision import DEFAULT_ATOL
from rlens.runtime.pipeline import DecoderState, Pipeline
from rlens.runtime.sessions import DeviceSession, open_session

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason=f"this onnxruntime ({ort.__version__}) has no CUDA provider: onnxruntime-gpu"
)
TOY_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "toy.png"


def bound_on_cpu(artifact: Path) -> Pipeline:
    """The CPU pipeline with every graph behind a ``DeviceSession`` whose 'device' is ORT's CPU."""
    pipeline = Pipeline.load(artifact, provider="cpu")
    for name, graph in pipeline.manifest.graphs.items():
        setattr(pipeline, name, DeviceSession(open_session(artifact / graph.file, "cpu"), device="cpu"))
    return pipeline


def prefill_state(pipeline: Pipeline, image: Path, prompt: str) -> tuple[np.ndarray, DecoderState]:
    ids, features, _ = pipeline.encode_prompts([image], [prompt])
    return pipeline.prefill(ids, features)


@pytest.mark.parametrize("kind", ["unreduced", "reduced_trim"])
def test_io_binding_keeps_the_cache_as_ort_values_and_answers_alike(
    exported: dict[str, Exported], reduced_trim: Path, image_file: Path, kind: str
) -> None:
    # the reduced decoder also takes 0-d span inputs, which must reach ORT as 0-d
    artifact = exported["llama"].artifact if kind == "unreduced" else reduced_trim
    plain, bound = Pipeline.load(artifact, provider="cpu"), bound_on_cpu(artifact)
    expected_logits, expected_state = prefill_state(plain, image_file, "What is in the picture?")
    logits, state = prefill_state(bound, image_file, "What is in the picture?")
    np.testing.assert_array_equal(logits, expected_logits)
    assert set(state.cache) == set(bound.cache_names)
    for name, value in state.cache.items():
        assert isinstance(value, ort.OrtValue), name
        np.testing.assert_array_equal(value.numpy(), expected_state.cache[name])
    prompts, images = ["What is in the picture?", "Say something"], [image_file, None]
    expected = plain.generate_batch(images, prompts, 8)
    assert [r.token_ids for r in bound.generate_batch(images, prompts, 8)] == [r.token_ids for r in expected]


def assert_cuda_matches_cpu(
    artifact: Path, image: Path, prompts: list[str], max_new: int = 12, tokens: bool = True
) -> None:
    """Prefill logits within the artifact's precision tolerance, the cache on the GPU, same tokens.

    The tolerance is ``rlens export``'s own (``DEFAULT_ATOL``, relative to max(1, |logit|)): fp32
    differs by summation order and TF32 (ORT's CUDA default); a quantized artifact's CPU kernel
    also quantizes the activations, the CUDA one does not, so the two sit on either side of PyTorch.
    """
    cpu, cuda = Pipeline.load(artifact, provider="cpu"), Pipeline.load(artifact, provider="cuda")
    expected_logits, _ = prefill_state(cpu, image, prompts[0])
    logits, state = prefill_state(cuda, image, prompts[0])
    scale = max(1.0, float(np.abs(expected_logits).max()))
    tolerance = DEFAULT_ATOL[cpu.manifest.precision] if cpu.manifest.precision != "fp32" else 2e-3
    assert float(np.abs(logits - expected_logits).max()) / scale < tolerance
    assert all(v.device_name().lower() == "cuda" for v in state.cache.values())
    for prompt in prompts:
        answer = cuda.generate(image, prompt, max_new)
        assert answer.token_ids, prompt
        if tokens:
            assert answer.token_ids == cpu.generate(image, prompt, max_new).token_ids, prompt


@needs_cuda
@pytest.mark.parametrize("backbone", ["llama", "mistral"])
def test_tiny_exports_answer_alike_on_cuda(
    exported: dict[str, Exported], image_file: Path, backbone: str
) -> None:
    if backbone not in exported:
        pytest.skip(f"no {backbone} tiny checkpoint in conftest.SPECS")
    assert_cuda_matches_cpu(exported[backbone].artifact, image_file, ["What is in the picture?"])


@needs_cuda
def test_reductions_and_trim_answer_alike_on_cuda(reduced_trim: Path, image_file: Path) -> None:
    assert_cuda_matches_cpu(reduced_trim, image_file, ["What is in the picture?", "Describe it"])


@needs_cuda
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_answer_alike_on_cuda(
    quantized: dict[str, Path], image_file: Path, precision: str
) -> None:
    # random weights leave near ties that quantization error may flip: the toy test compares tokens
    assert_cuda_matches_cpu(quantized[precision], image_file, ["What is in the picture?"], tokens=False)


@needs_cuda
def test_toy_model_answers_alike_on_cuda(toy_artifact: Path) -> None:
    questions = ["How many blue objects are there?", "Is the green square above or below the yellow cross?"]
    assert_cuda_matches_cpu(toy_artifact, TOY_IMAGE, questions, max_new=8)


@needs_cuda
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_toy_model_at_other_precisions_answers_alike_on_cuda(
    tmp_path: Path, toy_artifact: Path, precision: str
) -> None:
    artifact = tmp_path / f"toy-{precision}"
    assert rlens_main(["export", "toy", "-o", str(artifact), "-q", "--precision", precision]) == 0
    questions = ["How many blue objects are there?", "Is the green square above or below the yellow cross?"]
    assert_cuda_matches_cpu(artifact, TOY_IMAGE, questions, max_new=8)
    fp32 = Pipeline.load(toy_artifact, provider="cpu")
    for question in questions:  # and the fp32 model's answers
        expected = fp32.generate(TOY_IMAGE, question, 8).token_ids
        assert Pipeline.load(artifact, provider="cuda").generate(TOY_IMAGE, question, 8).token_ids == expected


@needs_cuda
def test_fp16_with_reductions_and_trim_runs_on_cuda(
    exported: dict[str, Exported], reduced_trim: Path, image_file: Path, tmp_path: Path
) -> None:
    flags = [*REDUCTION_FLAGS, "--clip-model", str(reduced_trim.parent / "clip"), "--precision", "fp16"]
    artifact = tmp_path / "fp16-reduced"
    assert rlens_main(["export", str(exported["llama"].checkpoint), "-o", str(artifact), "-q", *flags]) == 0
    assert_cuda_matches_cpu(artifact, image_file, ["What is in the picture?"], tokens=False)
