"""The model a benchmark runs: a random-initialized LLaVA of a named geometry, and what is built from it.

Random weights at a real model's sizes time like the real ones (FLOPs and memory traffic do not
depend on the values) and need no download. The checkpoint is a genuine
``LlavaForConditionalGeneration`` saved with ``save_pretrained``, so transformers and rlens' own
exporter read exactly what they read for a real LLaVA. Besides the artifacts, three *probe*
decoders are built from the same weights: no layers (final norm + ``lm_head``), and ``m`` layers
all of one kind (plain, or Hollow Attention + PAD-FFN): the stage times that full-depth figures are
composed from (``rlens.bench.compose``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlens.flops import Geometry
from rlens.reductions import Reductions
from rlens.tiny import (
    greedy_generation,
    llava_15_config,
    make_processor,
    make_tiny_clip,
    make_tokenizer,
    save_checkpoint,
)


@dataclass(frozen=True)
class BenchGeometry:
    """The sizes of a LLaVA: a CLIP ViT tower, a LLaMA decoder, and the matrices the peaks are taken on."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    full_layers: int  # the real model's decoder depth, which the figures are composed for
    max_positions: int
    peak_gemm: tuple[int, int, int]  # M, K, N of the MatMul whose speed is the machine's peak
    peak_gemv: tuple[int, int]  # K, N of the one-token MatMul whose weight-read speed bounds decoding

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


GEOMETRIES = {
    # ViT-L/14-336 (24 layers, features from the 23rd) and Vicuna-7B; llava-hf's vocabulary
    "llava-1.5-7b": BenchGeometry(
        1024, 4096, 24, 16, 336, 14, 4096, 11008, 32, 32, 32064, 32, 4096, (2048, 4096, 4096), (4096, 32064)
    ),
    # the same code path in seconds, for tests and a first look
    "small": BenchGeometry(64, 256, 3, 4, 112, 14, 128, 352, 4, 4, 500, 8, 512, (256, 512, 512), (512, 2048)),
}


def upper_half(depth: int) -> tuple[int, ...]:
    """The layers a reduced configuration reduces: the upper half (no ranking means anything for random
    weights, and the upper half is where rankings of trained LLaVAs put most reducible layers)."""
    return tuple(range(depth // 2, depth))


def probe_depth(layers: int) -> int:
    """Layers in each probe decoder: half the built depth, so the composition is checked at a depth it
    was not fitted on."""
    return max(1, layers // 2)


def flop_geometry(g: BenchGeometry, depth: int) -> Geometry:
    """What ``rlens.flops`` counts with, at ``depth`` decoder layers (the tower runs to its second-to-last
    layer, LLaVA-1.5's feature layer)."""
    return Geometry(
        hidden_size=g.hidden_size,
        num_layers=depth,
        num_heads=g.num_heads,
        num_kv_heads=g.num_kv_heads,
        head_dim=g.hidden_size // g.num_heads,
        intermediate_size=g.intermediate_size,
        vocab_size=g.vocab_size,
        vision_hidden=g.vision_hidden,
        vision_intermediate=g.vision_intermediate,
        vision_layers_run=g.vision_layers - 1,
        vision_tokens=g.num_visual_tokens + 1,
        patch_pixels=3 * g.patch_size**2,
        num_visual_tokens=g.num_visual_tokens,
    )


def bench_tokenizer(vocab_size: int, max_positions: int) -> Any:
    """rlens.tiny's tokenizer, grown with placeholder tokens to the geometry's vocabulary, so every id
    the random model can generate decodes."""
    tokenizer = make_tokenizer()
    tokenizer.model_max_length = max_positions
    missing = vocab_size - len(tokenizer)
    assert missing >= 0, f"vocabulary {vocab_size} is smaller than the tokenizer's {len(tokenizer)}"
    if missing:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(missing)])
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def llava_config(g: BenchGeometry, layers: int, tokenizer: Any) -> Any:
    """LlavaConfig of the geometry with ``layers`` decoder layers (LLaVA-1.5's choices elsewhere)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=g.vision_hidden,
        intermediate_size=g.vision_intermediate,
        num_hidden_layers=g.vision_layers,
        num_attention_heads=g.vision_heads,
        image_size=g.image_size,
        patch_size=g.patch_size,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=g.vocab_size,
        hidden_size=g.hidden_size,
        intermediate_size=g.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=g.num_heads,
        num_key_value_heads=g.num_kv_heads,
        max_position_embeddings=g.max_positions,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return llava_15_config(vision, text, tokenizer, g.num_visual_tokens)


def make_random_llava(out: Path, g: BenchGeometry, layers: int, seed: int = 0) -> Any:
    """Write a random LLaVA checkpoint (model, processor, greedy generation config); returns the model."""
    import torch
    from transformers import LlavaForConditionalGeneration

    tokenizer = bench_tokenizer(g.vocab_size, g.max_positions)
    processor = make_processor(tokenizer, g.image_size, g.patch_size)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(g, layers, tokenizer)).to(torch.float32).eval()
    model.generation_config = greedy_generation(tokenizer)
    save_checkpoint(model, processor, out)
    return model


PROBES = ("head", "full", "reduced", "whole", "half")
"""Probe decoders: no layers; ``m`` plain layers; ``m`` layers with Hollow Attention and PAD-FFN; and
at the built depth, all layers plain (``whole``) and the upper half reduced (``half``): issue 3's
"half the layers reduced", timed against each other."""


def write_probes(
    model: Any, out: Path, m: int, params: Reductions, precision: str = "fp32", depth: int | None = None
) -> dict[str, str]:
    """The probe decoders of a loaded model, built by the exporter's own graph code (at the exported
    configurations' ``precision``); name -> file."""
    from rlens.exporter import checkpoint
    from rlens.graphs.builder import save
    from rlens.graphs.decoder import build_decoder
    from rlens.graphs.quantize import with_precision

    spec, weights = checkpoint.decoder_spec(model), checkpoint.decoder_weights(model)
    visual = checkpoint.vision_spec(model).num_visual_tokens
    every = tuple(range(m))
    depth = depth or spec.num_layers
    builds = {
        "head": (replace(spec, num_layers=0), Reductions()),
        "full": (replace(spec, num_layers=m), Reductions()),
        "reduced": (replace(spec, num_layers=m), replace(params, hollow_layers=every, ffn_layers=every)),
        "whole": (replace(spec, num_layers=depth), Reductions()),
        "half": (
            replace(spec, num_layers=depth),
            replace(params, hollow_layers=upper_half(depth), ffn_layers=upper_half(depth)),
        ),
    }
    files = {}
    for name, (probe_spec, reductions) in builds.items():
        path = out / f"probe-{name}.onnx"
        save(with_precision(build_decoder(probe_spec, weights, reductions, visual), precision), path)
        files[name] = str(path)
    return files


def build_bench_model(
    work: str, geometry: str, layers: int, params: Reductions, seed: int, precision: str = "fp32"
) -> dict[str, Any]:
    """Checkpoint, the CLIP model TRIM needs (sharing its tower) and the probe decoders, under ``work``.

    Runs in a child process (``rlens.bench.measure.in_child``), so the model's memory goes with it.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(work)
    ckpt = root / "checkpoint"
    model = make_random_llava(ckpt, GEOMETRIES[geometry], layers, seed)
    probes = write_probes(model, root, probe_depth(layers), params, precision, depth=layers)
    del model
    clip = make_tiny_clip(root / "clip", ckpt, seed)
    return {"checkpoint": str(ckpt), "clip": str(clip), "probes": probes}


@dataclass(frozen=True)
class Config:
    """One way of running the model: transformers eager, or an exported artifact with or without reductions.

    ``reduced``: Hollow Attention and PAD-FFN on the upper half of the decoder layers (at every depth
    the figures are given for); ``trim``: TRIM in front of the decoder.
    """

    name: str
    framework: str  # "transformers" or "onnxruntime"
    reduced: bool = False
    trim: bool = False

    def reductions(self, depth: int, params: Reductions) -> Reductions:
        layers = upper_half(depth) if self.reduced else ()
        return replace(params, hollow_layers=layers, ffn_layers=layers)

    def layer_kinds(self, depth: int) -> list[str]:
        """The probe kind of each of ``depth`` layers: ``reduced`` or ``full``."""
        reduced = set(upper_half(depth)) if self.reduced else set()
        return ["reduced" if i in reduced else "full" for i in range(depth)]


CONFIGS = (
    Config("transformers-eager", "transformers"),
    Config("unreduced", "onnxruntime"),
    Config("hollow+pad-ffn", "onnxruntime", reduced=True),
    Config("trim", "onnxruntime", trim=True),
    Config("trim+hollow+pad-ffn", "onnxruntime", reduced=True, trim=True),
)
