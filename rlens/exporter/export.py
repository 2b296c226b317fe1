"""``rlens export``: a LLaVA checkpoint directory in, an artifact directory out.

    load checkpoint (fp32, once) -> build + save vision.onnx, embedding.onnx, decoder.onnx
    -> processor files + rlens.json -> PyTorch reference on a sample -> free the model
    -> run the artifact through the runtime and compare -> rename the directory into place

Everything is written into a hidden temporary directory beside the target and renamed only when
validation passed, so an interrupted or failed export leaves nothing that looks complete.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
from tqdm import tqdm

import rlens
from rlens import toy
from rlens.errors import RlensError
from rlens.exporter import checkpoint
from rlens.exporter.prompt_layout import prompt_layout
from rlens.exporter.validate import reference_sample, validate
from rlens.flops import prefill_flops
from rlens.graphs.builder import save
from rlens.graphs.decoder import build_decoder
from rlens.graphs.embedding import build_embedding
from rlens.graphs.quantize import with_precision
from rlens.graphs.vision import build_vision
from rlens.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    CostInfo,
    GenerationInfo,
    GraphInfo,
    Manifest,
    ModelInfo,
    TensorInfo,
    TokenizerInfo,
    TrimInfo,
    write_manifest,
)
from rlens.precision import DEFAULT_ATOL, PRECISIONS, is_quantized
from rlens.reductions import (
    DEFAULT_FFN_KEEP,
    DEFAULT_HOLLOW_WINDOW,
    DEFAULT_PROBE_EVERY,
    Reductions,
    parse_layers,
)
from rlens.runtime.preprocess import ImageProcessorConfig

if TYPE_CHECKING:
    from rlens.tensorrt.engines import EngineLimits

log = logging.getLogger("rlens")


@dataclass(frozen=True)
class ExportOptions:
    atol: float | None = None
    """Largest accepted difference to PyTorch, relative to max(1, max |reference|); None: the
    precision's default (``rlens.precision.DEFAULT_ATOL``)."""
    precision: str = "fp32"
    """Weights of the decoder's MatMuls: ``fp32``, or ``int8`` / ``int4`` blocks (ONNX Runtime only)."""
    progress: bool = True
    hollow_layers: str = ""
    """``N`` (first N of the ranking) or ``i,j,k``; empty: none."""
    hollow_window: int = DEFAULT_HOLLOW_WINDOW
    ffn_layers: str = ""
    ffn_keep: float = DEFAULT_FFN_KEEP
    probe_every: int = DEFAULT_PROBE_EVERY
    ranking: Path | None = None
    """A ranking.json from ``rlens rank``; ``calib`` runs the ranking when no file is given."""
    calib: Path | None = None
    clip_model: Path | None = None
    """The CLIPModel of LLaVA's vision tower: enables TRIM (``iqr`` unless ``trim`` says otherwise)."""
    trim: str = ""
    """``iqr``, ``ratio:R`` or ``off``; empty: ``iqr`` with a CLIP model, else ``off``."""
    trim_select: str = "high"
    target: str = "onnxruntime"
    """``onnxruntime`` (the graphs) or ``tensorrt`` (the graphs, then an engine per graph beside them)."""
    max_batch: int = 1
    max_context: int | None = None
    """TensorRT engines: prompt plus answer tokens; default the model's ``max_context``."""
    max_visual_tokens: int | None = None
    """TensorRT engines: image-feature rows per image; default the vision (or TRIM) graph's."""


def resolve_trim(options: ExportOptions) -> tuple[str, float | None] | None:
    """(mode, ratio) of TRIM, or None when it is off; checked before anything is loaded."""
    spec = options.trim.strip() or ("iqr" if options.clip_model is not None else "off")
    if spec == "off":
        return None
    if options.clip_model is None:
        raise RlensError(f"--trim {spec} needs --clip-model DIR (the CLIPModel of LLaVA's vision tower)")
    if options.trim_select not in ("high", "low"):
        raise RlensError(f"--trim-select takes high or low, got '{options.trim_select}'")
    if spec == "iqr":
        return "iqr", None
    if spec.startswith("ratio:"):
        try:
            ratio = float(spec.split(":", 1)[1])
        except ValueError:
            ratio = -1.0
        if 0 < ratio <= 1:
            return "ratio", ratio
    raise RlensError(f"--trim takes iqr, ratio:R (0 < R <= 1) or off, got '{spec}'")


def write_trim(
    model: Any, options: ExportOptions, mode: str, ratio: float | None, work: Path
) -> tuple[GraphInfo, TrimInfo, Any]:
    """Check the CLIP model against LLaVA's tower, write trim.onnx and CLIP's tokenizer; returns the CLIP."""
    from transformers import AutoTokenizer

    from rlens.exporter.clip import check_same_vision_tower, clip_text_spec, clip_weights, load_clip
    from rlens.graphs.trim import build_trim

    assert options.clip_model is not None
    clip = load_clip(options.clip_model)
    check_same_vision_tower(model, clip)
    spec = checkpoint.vision_spec(model)
    log.info(
        "building trim.onnx (%s, %s selection)", f"ratio {ratio}" if ratio else mode, options.trim_select
    )
    graph = build_trim(
        spec,
        *checkpoint.vision_weights(model),
        clip_text_spec(clip),
        clip_weights(clip),
        options.trim_select,
        mode,
        ratio,
    )
    info = write_graph(graph, work, "trim", options.progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(options.clip_model)
    except (OSError, ValueError) as e:
        raise RlensError(f"cannot load the tokenizer of the CLIP model '{options.clip_model}': {e}") from e
    tokenizer.save_pretrained(work / "clip")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else clip_text_spec(clip).eos_token_id
    trim = TrimInfo(
        mode=mode,
        select=options.trim_select,
        max_tokens=spec.num_visual_tokens + 1,
        ratio=ratio,
        clip_tokenizer="clip/tokenizer.json",
        clip_max_length=min(77, clip.config.text_config.max_position_embeddings),
        clip_pad_token_id=int(pad),
    )
    return info, trim, clip


def check_precision(options: ExportOptions) -> None:
    """Refuse an unknown precision, or a quantized one for TensorRT (fp16 is fine), before loading."""
    if options.precision not in PRECISIONS:
        raise RlensError(f"--precision {options.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if is_quantized(options.precision) and options.target != "onnxruntime":
        raise RlensError(
            f"--precision {options.precision} is for --target onnxruntime: its MatMulNBits is an ONNX "
            "Runtime operator, and the TensorRT track's graphs hold standard ONNX operators only"
        )


def resolve_reductions(options: ExportOptions, model_dir: Path, num_layers: int, work: Path) -> Reductions:
    """Turn the layer options into layer indices, ranking the layers first when a count needs it."""
    specs = (options.hollow_layers.strip(), options.ffn_layers.strip())
    counts = any(s.isdigit() for s in specs)
    ranking, source = None, None
    shipped = model_dir / "ranking.json"
    if options.ranking is None and options.calib is None and counts and shipped.is_file():
        log.info("using the ranking shipped with the checkpoint, %s", shipped)
        options = replace(options, ranking=shipped)
    if options.ranking is not None:
        from rlens.exporter.layer_ranking import read_ranking

        ranking, source = read_ranking(options.ranking), str(options.ranking)
    elif options.calib is not None and counts:
        from rlens.exporter.layer_ranking import rank_layers

        log.info("ranking layers on %s (give --ranking to reuse a ranking)", options.calib)
        path = work / "ranking.json"
        ranking = rank_layers(
            model_dir,
            options.calib,
            path,
            hollow_window=options.hollow_window,
            ffn_keep=options.ffn_keep,
            probe_every=options.probe_every,
            progress=options.progress,
        )
        source = "ranking.json"
    if ranking is not None and ranking.num_layers != num_layers:
        raise RlensError(
            f"the ranking covers {ranking.num_layers} layers but the model has {num_layers}; "
            "rank this model with `rlens rank`"
        )
    return Reductions(
        hollow_layers=parse_layers(
            specs[0], ranking.hollow_order if ranking else None, num_layers, "--hollow-layers"
        ),
        hollow_window=options.hollow_window,
        ffn_layers=parse_layers(specs[1], ranking.ffn_order if ranking else None, num_layers, "--ffn-layers"),
        ffn_keep=options.ffn_keep,
        probe_every=options.probe_every,
        ranking=source,
    )


def graph_info(model: ir.Model, files: list[str]) -> GraphInfo:
    """The manifest entry of a graph: its files and typed IO, read off the graph itself."""

    def tensors(values: Any) -> list[TensorInfo]:
        return [
            TensorInfo(v.name, v.dtype.name.lower(), [d if isinstance(d, int) else str(d) for d in v.shape])
            for v in values
        ]

    return GraphInfo(
        file=files[0],
        data_files=files[1:],
        inputs=tensors(model.graph.inputs),
        outputs=tensors(model.graph.outputs),
    )


def write_graph(model: ir.Model, directory: Path, name: str, progress: bool) -> GraphInfo:
    """Save one graph with a byte progress bar; weights stream to ``<name>.onnx.data``."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"writing {name}.onnx", disable=not progress, leave=False
    ) as bar:
        files = save(model, directory / f"{name}.onnx", progress=bar.update)
    return graph_info(model, files)


def generation_info(model: Any, tokenizer: Any) -> GenerationInfo:
    """EOS ids and sampling defaults from the checkpoint's generation config."""
    g = model.generation_config
    eos = g.eos_token_id if g.eos_token_id is not None else model.config.text_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not eos and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    return GenerationInfo(
        eos_token_ids=[int(e) for e in eos],
        max_new_tokens=int(g.max_new_tokens or 128),
        do_sample=bool(g.do_sample),
        temperature=float(g.temperature or 1.0),
        top_k=int(g.top_k or 0),
        top_p=float(g.top_p or 1.0),
    )


def build_manifest(
    model: Any, processor: Any, graphs: dict[str, GraphInfo], model_dir: Path, reductions: Reductions
) -> Manifest:
    """The manifest of a LLaVA export; the one place that decides what goes into ``rlens.json``."""
    import transformers

    dec = checkpoint.decoder_spec(model)
    vis = checkpoint.vision_spec(model)
    text = model.config.text_config
    tokenizer = processor.tokenizer
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Manifest(
        schema_version=SCHEMA_VERSION,
        rlens_version=rlens.__version__,
        model=ModelInfo(
            architecture="llava",
            text_backbone=text.model_type,
            hidden_size=dec.hidden_size,
            num_layers=dec.num_layers,
            num_heads=dec.num_heads,
            num_kv_heads=dec.num_kv_heads,
            head_dim=dec.head_dim,
            vocab_size=dec.vocab_size,
            max_context=int(text.max_position_embeddings),
            image_size=vis.image_size,
            num_visual_tokens=vis.num_visual_tokens,
            image_token_id=int(model.config.image_token_id),
        ),
        graphs=graphs,
        tokenizer=TokenizerInfo(
            file="tokenizer.json", bos_token_id=tokenizer.bos_token_id, pad_token_id=int(pad)
        ),
        prompt=prompt_layout(processor),
        image_processor=ImageProcessorConfig.from_dict(processor.image_processor.to_dict()),
        generation=generation_info(model, tokenizer),
        reductions=reductions,
        source={"model_dir": model_dir.name, "transformers_version": transformers.__version__},
    )


def write_graphs(
    model: Any,
    directory: Path,
    progress: bool,
    reductions: Reductions,
    tensorrt: bool = False,
    precision: str = "fp32",
) -> dict[str, GraphInfo]:
    """Build and save the three graphs, one at a time, so only one graph's nodes are alive at once.

    ``tensorrt``: the decoder reads its visual span from an input's shape (``build_decoder``).
    ``precision``: the decoder's MatMul weights (``with_precision``). The embedding is a Gather and
    stays fp32; so does the vision tower, which runs once per image rather than once per token:
    quantized as well, it raised the first shipped toy model's image-feature error from 5e-7 to 8e-3
    (int8) and 0.06 (int4), and its logit error from 0.006 to 0.010 (int8) and 0.071 to 0.097 (int4).
    """
    text = model.config.text_config
    builders: dict[str, Callable[[], ir.Model]] = {
        "vision": lambda: build_vision(checkpoint.vision_spec(model), *checkpoint.vision_weights(model)),
        "embedding": lambda: build_embedding(
            text.vocab_size,
            text.hidden_size,
            int(model.config.image_token_id),
            checkpoint.embedding_weights(model),
        ),
        "decoder": lambda: with_precision(
            build_decoder(
                checkpoint.decoder_spec(model),
                checkpoint.decoder_weights(model),
                reductions,
                checkpoint.vision_spec(model).num_visual_tokens,
                span_from_shape=tensorrt,
            ),
            precision,
        ),
    }
    graphs = {}
    for name, build in builders.items():
        log.info("building %s.onnx", name)
        graphs[name] = write_graph(build(), directory, name, progress)
    return graphs


def export(model_dir: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> Manifest:
    """Export a LLaVA checkpoint to an artifact directory; returns the manifest written."""
    if options.target not in ("onnxruntime", "tensorrt"):
        raise RlensError(f"--target {options.target!r}: choose onnxruntime or tensorrt")
    check_precision(options)
    model_dir, out_dir = toy.resolve(model_dir, "llava"), Path(out_dir)
    if options.target == "tensorrt":
        from rlens.tensorrt.engines import missing_requirement

        missing = missing_requirement()
        if missing is not None:  # say so now; the graphs are still written and validated
            log.warning("no TensorRT engines will be built here: %s", missing)
    if options.clip_model is not None:
        options = replace(options, clip_model=toy.resolve(options.clip_model, "clip"))
    num_layers = int(checkpoint.read_config(model_dir)["text_config"].get("num_hidden_layers", 32))
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise RlensError(f"'{out_dir}' exists and is not an rlens artifact; choose another output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    work.chmod(0o755)  # mkdtemp makes it private; an artifact is meant to be shared
    try:
        trim_mode = resolve_trim(options)
        if not options.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        reductions = resolve_reductions(options, model_dir, num_layers, work)  # may rank: before loading
        log.info("loading %s", model_dir)
        model = checkpoint.load_model(model_dir)
        processor = checkpoint.load_processor(model_dir)
        tensorrt = options.target == "tensorrt"
        graphs = write_graphs(model, work, options.progress, reductions, tensorrt, options.precision)
        trim, clip = None, None
        if trim_mode is not None:
            graphs["trim"], trim, clip = write_trim(model, options, *trim_mode, work)
        processor.save_pretrained(work)
        manifest = replace(
            build_manifest(model, processor, graphs, model_dir, reductions),
            trim=trim,
            precision=options.precision,
        )
        write_manifest(manifest, work)
        log.info("computing the PyTorch reference on a sample")
        sample = reference_sample(model, work, manifest, clip)
        geometry = checkpoint.flop_geometry(model)
        del model, clip
        gc.collect()
        log.info("validating the artifact against it")
        atol = options.atol if options.atol is not None else DEFAULT_ATOL[options.precision]
        validation = validate(work, sample, atol)
        tokens, visual = len(sample.prompt_ids), manifest.model.num_visual_tokens
        kept = validation.trim_tokens if validation.trim_tokens is not None else visual
        cost = CostInfo(
            prompt_tokens=tokens,
            visual_tokens=visual,
            unreduced=prefill_flops(geometry, tokens, visual).to_dict(),
            reduced=prefill_flops(geometry, tokens - visual + kept, kept, reductions).to_dict(),
            reduced_visual_tokens=kept,
        )
        manifest = replace(manifest, validation=validation, cost=cost)
        write_manifest(manifest, work)
        _move_into_place(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if options.target == "tensorrt":
        from rlens.tensorrt.engines import EngineLimits

        limits = EngineLimits(options.max_batch, options.max_context, options.max_visual_tokens)
        manifest = build_tensorrt_engines(out_dir, manifest, limits)
    return manifest


def build_tensorrt_engines(out_dir: Path, manifest: Manifest, limits: EngineLimits) -> Manifest:
    """Engines beside the validated graphs, recorded in rlens.json (``rlens export --target tensorrt``,
    and ``rlens engines`` for an artifact exported elsewhere).

    Without the tensorrt package or a GPU, ``build_engines`` raises an RlensError that says so; the
    artifact is complete for ONNX Runtime by then, and the message says where the graphs are.
    """
    from rlens.tensorrt.engines import build_engines

    manifest = replace(manifest, tensorrt=build_engines(out_dir, manifest, limits))
    write_manifest(manifest, out_dir)
    return manifest


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` (absent, empty, or an older artifact) by ``work`` with renames only."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{work.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
        work.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out_dir)
