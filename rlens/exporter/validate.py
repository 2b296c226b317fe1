"""Checking a freshly written artifact against the PyTorch model it came from (like optimum's --atol).

The reference numbers are computed while the PyTorch model is loaded; the model is then freed
before ONNX Runtime loads the graphs, so validation never holds two copies of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rlens.errors import RlensError
from rlens.manifest import Manifest, ValidationInfo
from rlens.runtime.preprocess import preprocess
from rlens.runtime.prompt import PromptEncoder

SAMPLE_PROMPT = "Describe the image in detail."


@dataclass
class Sample:
    """A generated input (noise image, fixed question) and the PyTorch model's outputs on it."""

    image: Image.Image
    prompt_ids: list[int]
    image_features: np.ndarray  # [V, d]
    prefill_logits: np.ndarray  # [vocab]
    next_token: int
    decode_logits: np.ndarray  # [vocab]
    trim_features: np.ndarray | None = None  # [n, d]: what TRIM keeps of the sample, with its instruction


def sample_image(size: int, seed: int = 0) -> Image.Image:
    """A deterministic noise image, deliberately not square so resize and crop are exercised."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size + 11, size + 5, 3), dtype=np.uint8))


def reference_sample(model: Any, artifact_dir: Path, manifest: Manifest, clip: Any = None) -> Sample:
    """Run the PyTorch model (and TRIM, given the CLIP model) on the sample, laid out as the runtime does."""
    import torch

    image = sample_image(manifest.model.image_size)
    encoder = PromptEncoder(artifact_dir, manifest)
    ids = encoder.encode(SAMPLE_PROMPT, manifest.model.num_visual_tokens)
    pixels = torch.from_numpy(preprocess(image, manifest.image_processor))
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        if manifest.reductions.active:  # the PyTorch reference of the reductions is the oracle
            from rlens.exporter.reference import ReducedDecoder, prepare_inputs

            decoder = ReducedDecoder(model, manifest.reductions)
            inputs = prepare_inputs(model, input_ids, pixels)
            prefill = decoder.logits(inputs)[0]
            token = int(prefill.argmax())
            new_embeds = model.model.get_input_embeddings()(torch.tensor([[token]]))
            decode = decoder.logits(inputs.append(new_embeds))[0]
        else:  # transformers itself is the oracle
            out = model(input_ids=input_ids, pixel_values=pixels, use_cache=True)
            prefill = out.logits[0, -1]
            token = int(prefill.argmax())
            decode = model(
                input_ids=torch.tensor([[token]]),
                past_key_values=out.past_key_values,
                use_cache=True,
                attention_mask=torch.ones(1, len(ids) + 1, dtype=torch.long),
            ).logits[0, -1]
    trim_features = None
    if manifest.trim is not None and clip is not None:
        from rlens.exporter.trim_reference import trim_reference
        from rlens.runtime.prompt import InstructionEncoder

        clip_ids, clip_mask = InstructionEncoder(artifact_dir, manifest).encode([SAMPLE_PROMPT])
        t = manifest.trim
        with torch.no_grad():
            ((_, kept),) = trim_reference(
                model,
                clip,
                pixels,
                torch.from_numpy(clip_ids),
                torch.from_numpy(clip_mask),
                t.select,
                t.mode,
                t.ratio,
            )
        trim_features = kept.numpy()
    return Sample(
        trim_features=trim_features,
        image=image,
        prompt_ids=ids,
        image_features=features.numpy(),
        prefill_logits=prefill.numpy(),
        next_token=token,
        decode_logits=decode.numpy(),
    )


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max(1, max |expected|): absolute for small values, relative for large."""
    return float(np.abs(actual - expected).max() / max(1.0, float(np.abs(expected).max())))


def validate(artifact_dir: Path, sample: Sample, atol: float) -> ValidationInfo:
    """Run the artifact through the runtime on the sample; refuse it when it diverges beyond ``atol``."""
    from rlens.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(artifact_dir)
    pixels = preprocess(sample.image, pipeline.image_config)
    (features,) = pipeline.vision.run(None, {"pixel_values": pixels})
    features = features[0]  # every visual token: the decoder is checked on the full image
    logits, state = pipeline.prefill([sample.prompt_ids], features)
    step = pipeline.decode_one_token(np.array([sample.next_token]), state)
    trim_diff, trim_tokens = None, None
    if sample.trim_features is not None:
        kept, (count,) = pipeline.encode_images([sample.image], [SAMPLE_PROMPT])
        if count != len(sample.trim_features):
            raise RlensError(
                f"the exported TRIM graph keeps {count} tokens of the sample where the PyTorch "
                f"reference keeps {len(sample.trim_features)}; nothing was written"
            )
        trim_diff, trim_tokens = relative_error(kept, sample.trim_features), count
    info = ValidationInfo(
        atol=atol,
        image_features_max_diff=relative_error(features, sample.image_features),
        prefill_logits_max_diff=relative_error(logits[0], sample.prefill_logits),
        decode_logits_max_diff=relative_error(step[0], sample.decode_logits),
        trim_features_max_diff=trim_diff,
        trim_tokens=trim_tokens,
    )
    worst = max(
        info.image_features_max_diff,
        info.prefill_logits_max_diff,
        info.decode_logits_max_diff,
        trim_diff or 0.0,
    )
    if not worst <= atol:  # also catches NaN
        raise RlensError(
            "the exported graphs diverge from the PyTorch model: "
            f"image features {info.image_features_max_diff:.2e}, "
            f"prefill logits {info.prefill_logits_max_diff:.2e}, "
            f"decode logits {info.decode_logits_max_diff:.2e}, "
            f"TRIM features {trim_diff if trim_diff is not None else 0:.2e} "
            f"> --atol {atol:g}; nothing was written (report this with the checkpoint's config.json)"
        )
    return info
