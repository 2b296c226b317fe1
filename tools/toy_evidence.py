"""What each reduction costs in accuracy, measured on the shipped toy model: the README's evidence.

    python tools/toy_evidence.py --work runs/evidence --out docs

1. Writes the held-out set (``toy_set(--eval-n, seed 0)``, what ``rlens eval --toy-set N --seed 0``
   writes) and a calibration set (``--calib-n`` questions, seed 1).
2. With ``--rank``: ranks the toy LLaVA's layers on the calibration set anew (in
   ``WORK/ranking.json``) and installs the ranking as
   ``rlens/toy/weights/llava/ranking.json`` (what ``rlens export toy --ffn-layers N`` uses).
3. Exports and evaluates, each through ``rlens.exporter.export`` and ``rlens.eval`` (so through the
   ONNX pipeline a user runs):
   - for each list (Hollow Attention, PAD-FFN) the first n layers of the ranked order, of a random
     order and of the reverse order, n = 0, 2, 4, 6, 8;
   - TRIM with high and with low selection;
   - combined configurations, for the accuracy / prefill-FLOPs frontier.
4. Writes ``OUT/toy_evidence.json``, ``OUT/toy_orders.png``, ``OUT/toy_frontier.png`` and prints the
   markdown tables of the README.

Results are cached per configuration in ``WORK/results.jsonl``, so an interrupted run goes on; a line
written for other weights, another ranking or other settings is ignored.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from rlens import toy
from rlens.eval import evaluate_artifact
from rlens.exporter.export import ExportOptions, export
from rlens.exporter.layer_ranking import rank_layers, read_ranking
from rlens.flops import Geometry, prefill_flops
from rlens.manifest import Manifest
from rlens.toy.data import KINDS, toy_set, write_jsonl

LISTS = ("hollow", "ffn")
ORDERS = ("ranked", "random", "reverse")
COUNTS = (0, 2, 4, 6, 8)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def layers_arg(layers: list[int]) -> str:
    return ",".join(map(str, layers))


def orders(ranking_path: Path, seed: int) -> dict[str, dict[str, list[int]]]:
    """Per list: the ranked order, a seeded random permutation, and the ranked order reversed."""
    ranking = read_ranking(ranking_path)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[int]]] = {}
    for name, ranked in (("hollow", ranking.hollow_order), ("ffn", ranking.ffn_order)):
        out[name] = {
            "ranked": list(ranked),
            "random": [int(i) for i in rng.permutation(len(ranked))],
            "reverse": list(reversed(ranked)),
        }
    return out


def configurations(order: dict[str, dict[str, list[int]]], n_layers: int) -> list[dict[str, object]]:
    """Every exported configuration: name, export options, and what it is for."""
    configs: list[dict[str, object]] = [{"name": "unreduced", "group": "base"}]
    for lst in LISTS:
        for name in ORDERS:
            for n in COUNTS[1:]:
                if n == n_layers and name != "ranked":
                    continue  # all layers: the same set whatever the order
                layers = layers_arg(order[lst][name][:n])
                configs.append(
                    {"name": f"{lst}-{name}-{n}", "group": "orders", "list": lst, "order": name, "n": n}
                    | {f"{lst}_layers": layers}
                )
    for select in ("high", "low"):
        configs.append({"name": f"trim-{select}", "group": "trim", "trim": "iqr", "trim_select": select})
    half = n_layers // 2
    for h in (half, n_layers):
        for f in (half, n_layers):
            base = {
                "hollow_layers": layers_arg(order["hollow"]["ranked"][:h]),
                "ffn_layers": layers_arg(order["ffn"]["ranked"][:f]),
            }
            configs.append({"name": f"both-{h}-{f}", "group": "frontier"} | base)
            configs.append({"name": f"trim-both-{h}-{f}", "group": "frontier", "trim": "iqr"} | base)
    return configs


def run_config(config: dict[str, object], args: argparse.Namespace, data: Path) -> dict[str, object]:
    trim = str(config.get("trim", ""))
    options = ExportOptions(
        progress=False,
        hollow_layers=str(config.get("hollow_layers", "")),
        hollow_window=args.hollow_window,
        ffn_layers=str(config.get("ffn_layers", "")),
        ffn_keep=args.ffn_keep,
        probe_every=args.probe_every,
        clip_model=Path(toy.TOY) if trim else None,
        trim=trim or "off",
        trim_select=str(config.get("trim_select", "high")),
    )
    out = args.work / "artifact"
    shutil.rmtree(out, ignore_errors=True)
    manifest = export(toy.TOY, out, options)
    report = evaluate_artifact(out, data, batch_size=args.batch_size)
    cost = manifest.cost
    assert cost is not None
    geometry_tokens = cost.prompt_tokens - cost.visual_tokens
    flops = reduced_flops(manifest, geometry_tokens, report.mean_visual_tokens)
    shutil.rmtree(out, ignore_errors=True)
    return {
        **config,
        "accuracy": report.accuracy,
        "per_kind": {k: v.accuracy for k, v in report.per_kind.items()},
        "visual_tokens": report.mean_visual_tokens,
        "ttft_ms": report.median_ttft_ms,
        "prefill_gflops": flops / 1e9,
        "unreduced_gflops": cost.unreduced["total"] / 1e9,
    }


def reduced_flops(manifest: Manifest, text_tokens: int, visual_tokens: float) -> float:
    """Prefill FLOPs of the exported configuration at the mean number of visual tokens it kept."""
    kept = round(visual_tokens)
    return float(prefill_flops(toy_geometry(), text_tokens + kept, kept, manifest.reductions).total)


@functools.cache
def toy_geometry() -> Geometry:
    """The toy LLaVA's sizes for ``rlens.flops``, read once from the checkpoint."""
    from rlens.exporter import checkpoint

    return checkpoint.flop_geometry(checkpoint.load_model(toy.resolve(toy.TOY)))


def plot_orders(results: dict[str, dict[str, object]], n_layers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = float(results["unreduced"]["accuracy"])  # type: ignore[arg-type]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    titles = {"hollow": "Hollow Attention", "ffn": "PAD-FFN"}
    for ax, lst in zip(axes, LISTS, strict=True):
        for name, style in zip(ORDERS, ("o-", "s--", "^:"), strict=True):
            xs, ys = [0], [base]
            for n in COUNTS[1:]:
                key = f"{lst}-{name if n < n_layers else 'ranked'}-{n}"
                if key in results:
                    xs.append(n)
                    ys.append(float(results[key]["accuracy"]))  # type: ignore[arg-type]
            ax.plot(xs, [100 * y for y in ys], style, label=f"{name} order")
        ax.set_title(titles[lst])
        ax.set_xlabel("reduced layers")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(results: dict[str, dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [
        r
        for r in results.values()
        if r["group"] in ("base", "frontier", "trim") or r.get("order") == "ranked"
    ]
    for r in points:
        x, y = float(r["prefill_gflops"]), 100 * float(r["accuracy"])  # type: ignore[arg-type]
        ax.plot(x, y, "o", color="C1" if r.get("trim") else "C0")
        ax.annotate(str(r["name"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    frontier = sorted(points, key=lambda r: float(r["prefill_gflops"]))  # type: ignore[arg-type]
    best, xs, ys = -1.0, [], []
    for r in frontier:
        if float(r["accuracy"]) > best:  # type: ignore[arg-type]
            best = float(r["accuracy"])  # type: ignore[arg-type]
            xs.append(float(r["prefill_gflops"]))  # type: ignore[arg-type]
            ys.append(100 * best)
    ax.step(xs, ys, where="post", color="grey", alpha=0.6, label="frontier")
    ax.set_xlabel("prefill GFLOPs per question (vision + decoder + lm_head)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("toy model: accuracy against prefill FLOPs (orange: with TRIM)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(results: dict[str, dict[str, object]]) -> str:
    rows = ["| configuration | accuracy | " + " | ".join(KINDS) + " | visual tokens | prefill GFLOPs |"]
    rows.append("|---" * (4 + len(KINDS)) + "|")
    for r in results.values():
        kinds = r["per_kind"]
        assert isinstance(kinds, dict)
        rows.append(
            f"| {r['name']} | {100 * float(r['accuracy']):.1f}% | "  # type: ignore[arg-type]
            + " | ".join(f"{100 * kinds.get(k, 0):.0f}" for k in KINDS)
            + f" | {float(r['visual_tokens']):.1f} | {float(r['prefill_gflops']):.3f} |"  # type: ignore[arg-type]
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--out", type=Path, default=Path("docs"), help="JSON and charts go here")
    parser.add_argument("--eval-n", type=int, default=600, help="held-out questions per configuration")
    parser.add_argument("--calib-n", type=int, default=64)
    parser.add_argument("--rank", action="store_true", help="rank the layers and install ranking.json")
    parser.add_argument("--hollow-window", type=int, default=8)
    parser.add_argument("--ffn-keep", type=float, default=0.1)
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--only", default="", help="comma-separated groups to run (base,orders,trim,frontier)"
    )
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # both sets are written afresh on every run (seconds): a set left from an older generator would
    # otherwise be evaluated, or ranked on, as if it were today's
    data = write_jsonl(toy_set(args.eval_n, seed=0), args.work / "eval" / "data.jsonl")
    calib = write_jsonl(toy_set(args.calib_n, seed=1), args.work / "calib" / "calib.jsonl")
    ranking = toy.resolve(toy.TOY) / "ranking.json"
    if args.rank or not ranking.exists():
        log("ranking layers")
        # ranked anew in the work folder, then installed: a ranking's fingerprint names the model by its
        # config and weight sizes, so one left from a retrained model of the same shape would pass
        scratch = args.work / "ranking.json"
        scratch.unlink(missing_ok=True)
        rank_layers(
            toy.TOY,
            calib,
            scratch,
            hollow_window=args.hollow_window,
            ffn_keep=args.ffn_keep,
            probe_every=args.probe_every,
        )
        shutil.copyfile(scratch, ranking)
    order = orders(ranking, seed=0)
    n_layers = len(order["ffn"]["ranked"])

    # cached results count only for this model, ranking and these settings: after retraining or
    # re-ranking, an old line would otherwise pass for a measurement of the new model
    key = hashlib.sha256()
    for part in (toy.resolve(toy.TOY) / "model.safetensors", ranking, data):
        key.update(part.read_bytes())
    key.update(repr((args.hollow_window, args.ffn_keep, args.probe_every)).encode())
    fingerprint = key.hexdigest()[:16]
    cache = args.work / "results.jsonl"
    results: dict[str, dict[str, object]] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            if r.get("fingerprint") == fingerprint:
                results[r["name"]] = r
    groups = set(args.only.split(",")) if args.only else None
    for config in configurations(order, n_layers):
        if config["name"] in results or (groups and config["group"] not in groups):
            continue
        log(f"{config['name']}")
        result = run_config(config, args, data)
        log(
            f"{config['name']}: accuracy {100 * result['accuracy']:.1f}%, "
            f"{result['visual_tokens']:.1f} visual tokens"
        )
        result["fingerprint"] = fingerprint
        results[str(config["name"])] = result
        with cache.open("a") as f:
            f.write(json.dumps(result) + "\n")

    summary = {
        "eval": {"n": args.eval_n, "seed": 0},
        "calib": {"n": args.calib_n, "seed": 1},
        "hollow_window": args.hollow_window,
        "ffn_keep": args.ffn_keep,
        "probe_every": args.probe_every,
        "orders": order,
        "results": list(results.values()),
    }
    (args.out / "toy_evidence.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_orders(results, n_layers, args.out / "toy_orders.png")
    plot_frontier(results, args.out / "toy_frontier.png")
    print(tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
