"""Measurements, each in its own child process so its peak resident memory is its own.

A child is started with ``spawn`` (a fresh interpreter: a forked child would inherit, and count,
the parent's pages), runs one function, and returns a plain dict. Every measurement warms up once
and reports the median of ``runs`` repetitions.

- ``gemm_peak``: the machine's fp32 MatMul speed through ONNX Runtime, the yardstick for GFLOP/s.
- ``gemv_peak``: the speed at which one token's fp32 MatMul streams its weights (GB/s), the yardstick
  for decoding, which reads every weight once per token.
- ``measure_eager``: transformers ``generate`` at the built depth, and again with the decoder cut to
  0 and ``m`` layers (the stage times its full-depth figures are composed from).
- ``measure_pipeline``: ``rlens.runtime.Pipeline.generate`` on an exported artifact, every session
  call timed; then the probe decoders on the same prefill inputs.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

BenchResult = dict[str, Any]


def child_process() -> ProcessPoolExecutor:
    """One spawned worker process; ``submit(fn, *args).result()`` re-raises its exceptions here."""
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def in_child(fn: Callable[..., BenchResult], *args: Any) -> BenchResult:
    """``fn(*args)`` in a fresh process of its own, so its peak memory is its own."""
    with child_process() as child:
        return child.submit(fn, *args).result()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gemm_peak(m: int, k: int, n: int, runs: int) -> BenchResult:
    """GFLOP/s of one fp32 ``[m, k] @ [k, n]`` MatMul (weights constant, as in the graphs) in ONNX Runtime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"A": rng.standard_normal((m, k), dtype=np.float32)}
    ms = median_ms(lambda: session.run(None, feeds), runs)
    return {"shape": [m, k, n], "ms": ms, "gflops_per_s": 2 * m * k * n / ms / 1e6}


def gemv_peak(k: int, n: int, runs: int) -> BenchResult:
    """GB/s at which a ``[1, k] @ [k, n]`` fp32 MatMul reads its constant weight in ONNX Runtime.

    A decode step is a chain of such products, one token against each weight matrix, so its speed is
    bounded by how fast the weights stream from memory: with ``n`` large enough that the weight
    (``4 k n`` bytes) is far beyond the caches, this is that bound as ONNX Runtime reaches it.
    """
    result = gemm_peak(1, k, n, runs)
    return {"shape": [k, n], "ms": result["ms"], "gb_per_s": 4 * k * n / result["ms"] / 1e6}


# -- transformers eager --------------------------------------------------------------------------
def measure_eager(
    checkpoint: str, image_size: int, prompt: str, new_tokens: int, runs: int, probe_layers: int
) -> BenchResult:
    """``LlavaForConditionalGeneration.generate`` (fp32, greedy) with its own processor, timed per token.

    Time to first token runs from the raw image and text to the first generated token (processor
    included, as the pipeline's includes its preprocessing). The image is the exporter's validation
    sample, as in ``measure_pipeline``, so both frameworks see the same pixels. After the timed runs at
    the built depth the decoder is cut to ``probe_layers`` and then 0 layers and timed again: the
    per-layer slope and the rest (vision, embedding, lm_head, processor) that full-depth figures are
    composed from.
    """
    import torch
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging as hf_logging

    from rlens.exporter import checkpoint as ckpt
    from rlens.exporter.validate import sample_image

    hf_logging.disable_progress_bar()
    model = ckpt.load_model(Path(checkpoint))
    processor = ckpt.load_processor(Path(checkpoint))
    image = sample_image(image_size)
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    image_id = int(model.config.image_token_id)

    class Clock(BaseStreamer):
        """``generate`` hands the prompt, then each new token, to its streamer: stamp the tokens."""

        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value: Any) -> None:
            self.calls.append(time.perf_counter())

        def end(self) -> None:
            pass

    def once() -> tuple[float, float, list[int], Any]:
        clock = Clock()
        start = time.perf_counter()
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                suppress_tokens=[image_id],  # the pipeline never generates the image placeholder
                streamer=clock,
            )
        stamps = clock.calls[1:]
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        ids = inputs["input_ids"][0]
        return (stamps[0] - start) * 1e3, decode, out[0, len(ids) :].tolist(), ids

    def timed(depth_runs: int) -> dict[str, Any]:
        once()  # warm-up
        results = [once() for _ in range(depth_runs)]
        return {
            "ttft_ms": statistics.median(r[0] for r in results),
            "decode_tokens_per_s": statistics.median(r[1] for r in results),
            "tokens": results[0][2],
            "prompt_tokens": len(results[0][3]),
            "visual_tokens": int((results[0][3] == image_id).sum()),
        }

    direct = timed(runs)
    peak = peak_rss_mb()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    language_model = model.model.language_model
    layers = list(language_model.layers)
    depths = {}
    for depth in (probe_layers, 0):
        language_model.layers = torch.nn.ModuleList(layers[:depth])
        model.config.text_config.num_hidden_layers = depth
        depths[depth] = timed(runs)
    eos = model.generation_config.eos_token_id
    tokens = direct["tokens"]
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return {
        "ttft_ms": direct["ttft_ms"],
        "decode_tokens_per_s": direct["decode_tokens_per_s"],
        "tokens": tokens,
        "prompt_tokens": direct["prompt_tokens"],
        "visual_tokens": direct["visual_tokens"],
        "peak_rss_mb": peak,
        "weights_mb": weights / 2**20,
        "depths": {str(d): {k: v for k, v in r.items() if k != "tokens"} for d, r in depths.items()},
    }


# -- the exported pipeline -----------------------------------------------------------------------
class TimedSession:
    """An ONNX Runtime session whose ``run`` calls are timed; the rest passes through.

    Only times are kept, and whether the call was a prefill (its cache inputs are empty), plus the
    feeds of the first prefill, which the probes replay: keeping every call's feeds would keep every
    step's KV cache alive and inflate the peak memory being measured.
    """

    def __init__(self, session: Any) -> None:
        self._session = session
        self.calls: list[tuple[float, bool]] = []  # (ms, prefill)
        self.first_prefill: dict[str, np.ndarray] | None = None

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        start = time.perf_counter()
        result = self._session.run(outputs, feeds)
        ms = (time.perf_counter() - start) * 1e3
        prefill = is_prefill(feeds)
        if prefill and self.first_prefill is None:
            self.first_prefill = dict(feeds)
        self.calls.append((ms, prefill))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def instrument(pipeline: Any) -> dict[str, TimedSession]:
    """Wrap the pipeline's sessions (the vision or TRIM graph, embedding, decoder) in ``TimedSession``."""
    timed = {}
    for name in ("trim" if pipeline.trim is not None else "vision", "embedding", "decoder"):
        timed[name] = TimedSession(getattr(pipeline, name))
        pipeline.__dict__[name] = timed[name]
    return timed


def is_prefill(feeds: dict[str, np.ndarray]) -> bool:
    """A call with empty past tensors (the decoder's prefill); graphs without a cache count as one too."""
    past = [v for k, v in feeds.items() if k.startswith("past_key_values")]
    return not past or past[0].shape[2] == 0


def measure_pipeline(
    artifact: str, probes: dict[str, str], kinds: list[str], prompt: str, new_tokens: int, runs: int
) -> BenchResult:
    """``Pipeline.generate`` on ``artifact``: TTFT, decode rate, tokens, peak memory, time per graph call.

    Then each probe decoder of ``kinds`` (and the head) runs the prefill this configuration fed its
    decoder, and one decode step after it: the per-layer stage times of ``rlens.bench.compose``.
    Peak memory is read before the probes are loaded.
    """
    from rlens.exporter.validate import sample_image
    from rlens.runtime.pipeline import Pipeline
    from rlens.runtime.sessions import open_session

    pipeline = Pipeline.load(artifact)
    image = sample_image(pipeline.manifest.model.image_size)
    timed = instrument(pipeline)
    pipeline.generate(image, prompt, max_new_tokens=new_tokens)  # warm-up
    for session in timed.values():
        session.calls.clear()
    results = [pipeline.generate(image, prompt, max_new_tokens=new_tokens) for _ in range(runs)]
    peak = peak_rss_mb()

    encode, decoder = next(iter(timed)), timed["decoder"]
    steps = [ms for ms, prefill in decoder.calls if not prefill]
    stages = {
        encode: statistics.median(ms for ms, _ in timed[encode].calls),
        "decoder_prefill": statistics.median(ms for ms, prefill in decoder.calls if prefill),
        "decoder_step": statistics.median(steps) if steps else 0.0,
    }
    prefill_feeds, m = decoder.first_prefill, pipeline.manifest
    assert prefill_feeds is not None
    del pipeline, timed, decoder
    probe_ms = {}
    for kind in ("head", *kinds):
        session = open_session(Path(probes[kind]), "cpu")
        probe_ms[kind] = time_probe(session, prefill_feeds, runs, runs * (new_tokens - 1))
        del session
    follows = None
    if "reduced" in kinds:  # the configuration's own feeds, so the visual span is the real one
        pair = {
            kind: open_session(Path(probes[probe]), "cpu")
            for kind, probe in (("full", "whole"), ("half", "half"))
        }
        follows = interleaved_prefill_ms(pair, prefill_feeds, max(runs, 7))
        del pair

    files = [g for name, g in m.graphs.items() if name != ("vision" if m.trim else "trim")]
    weights = sum((Path(artifact) / f).stat().st_size for g in files for f in (g.file, *g.data_files))
    first = results[0]
    return {
        "ttft_ms": statistics.median(r.ttft_ms for r in results),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results),
        "tokens": first.token_ids,
        "prompt_tokens": len(first.prompt_ids),
        "visual_tokens": first.num_visual_tokens,
        "peak_rss_mb": peak,
        "weights_mb": weights / 2**20,
        "precision": m.precision,
        "stages_ms": stages,
        "probes_ms": probe_ms,
        "half_vs_full_ms": follows,
    }


def prefill_feeds_for(session: Any, prefill: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A recorded decoder prefill's feeds, cut to the inputs of ``session`` (a probe of any depth)."""
    names = {i.name for i in session.get_inputs()}
    layers = sum(1 for n in names if n.startswith("past_key_values") and n.endswith(".key"))
    empty_past = prefill["past_key_values.0.key"]
    feeds = {k: v for k, v in prefill.items() if k in names and not k.startswith("past_key_values")}
    return feeds | {f"past_key_values.{i}.{kv}": empty_past for i in range(layers) for kv in ("key", "value")}


def interleaved_prefill_ms(
    sessions: dict[str, Any], prefill: dict[str, np.ndarray], rounds: int
) -> dict[str, Any]:
    """Median prefill ms of each session, timed in alternating rounds (A B A B ...), with every
    round's times: an A/B taken in two blocks lets a slow spell of the machine land on one side only,
    which is how the end-to-end pipeline and the per-layer probes came to disagree by 10%."""
    feeds = {name: prefill_feeds_for(s, prefill) for name, s in sessions.items()}
    for name, s in sessions.items():
        s.run(None, feeds[name])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return {"median": {n: statistics.median(t) for n, t in times.items()}, "rounds": times}


def time_probe(session: Any, prefill: dict[str, np.ndarray], runs: int, steps: int) -> dict[str, float]:
    """Median ms of a probe decoder's prefill on the configuration's own feeds (``runs`` times) and of a
    decode step after it (``steps`` times: as many as the timed generations made, a step being short
    enough for a busy moment of the machine to sway a median of few)."""
    names = {i.name for i in session.get_inputs()}
    batch, length = prefill["attention_mask"].shape
    feeds = prefill_feeds_for(session, prefill)
    prefill_ms = median_ms(lambda: session.run(None, feeds), runs)
    _, *presents = session.run(None, feeds)
    step = {
        "inputs_embeds": prefill["inputs_embeds"][:, -1:],
        "attention_mask": np.ones((batch, length + 1), np.int64),
        "position_ids": prefill["position_ids"][:, -1:] + 1,
    }
    if "visual_start" in names:  # a decode step carries no visual tokens
        step |= {"visual_start": np.array(0, np.int64), "visual_lengths": np.zeros(batch, np.int64)}
    # the presents come as key, value per layer, as the runtime pairs them (Pipeline.cache_names)
    past = [f"past_key_values.{i}.{kv}" for i in range(len(presents) // 2) for kv in ("key", "value")]
    step |= dict(zip(past, presents, strict=True))
    return {"prefill": prefill_ms, "step": median_ms(lambda: session.run(None, step), steps)}


def export_config(checkpoint: str, out: str, options: dict[str, Any]) -> BenchResult:
    """``rlens.exporter.export`` in a child, so the PyTorch model it loads leaves with the child."""
    from transformers.utils import logging as hf_logging

    from rlens.exporter.export import ExportOptions, export

    hf_logging.disable_progress_bar()
    manifest = export(checkpoint, out, ExportOptions(progress=False, **options))
    return {"validation": asdict(manifest.validation) if manifest.validation else None}
