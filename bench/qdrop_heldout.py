"""Could each module choose QDrop on or off by its held-out error? Issue 10 §3 leaves DeiT W4A4 better without QDrop
and Swin better with it; the safeguard already measures every module's output error on held-out calibration images,
so a per-module choice between the two would cost one more reconstruction per module. This script asks, from runs
already made, whether that error tells the two settings apart the way Top-1 does.

    python bench/qdrop_heldout.py

For every model and width with runs at the default budget both with QDrop (the library default) and without it
(``qdrop_prob=1.0``) on the same seeds, it pairs the runs seed by seed. The first attention block sees the same inputs
in both runs (QDrop has nothing to mix before it), so its held-out error compares the two settings on equal terms;
later modules see inputs that earlier modules' choices already moved. Reads ``benchmark.json``,
``budget_variants.json`` and ``gpu_budget/budget_seeds.json``; writes ``qdrop_heldout.md``. Runs nothing.
"""

from __future__ import annotations

import math
import statistics

from harness import REPO, load_results

from adfq_lightning.io import atomic_write

RESULTS = REPO / "bench" / "results"
SOURCES = ("benchmark.json", "budget_variants.json", "gpu_budget/budget_seeds.json")
DEFAULT_BUDGET = 200


def paired_runs() -> dict[tuple[str, int], list[tuple[dict, dict]]]:
    """(model, bits) -> [(run with QDrop, run without), ...], one pair per seed that has both."""
    with_qdrop, without = {}, {}
    for name in SOURCES:
        for run in load_results(RESULTS / name)["runs"]:
            if run["preset"] != "adfq" or run["iters"] != DEFAULT_BUDGET or run["batch_size"] != 32:
                continue
            key = (run["model"], run["w_bits"], run["seed"])
            if run["changes"] == {} and run["tag"] == "":
                with_qdrop.setdefault(key, run)
            elif run["changes"] == {"qdrop_prob": 1.0}:
                without.setdefault(key, run)
    pairs: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    for key in sorted(with_qdrop.keys() & without.keys()):
        pairs.setdefault(key[:2], []).append((with_qdrop[key], without[key]))
    return pairs


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.3f} ({se:.3f})"


def first_attention(run: dict) -> dict:
    return next(m for m in run["modules"] if m["name"].endswith("attn"))


def row(model: str, bits: int, pairs: list[tuple[dict, dict]]) -> str:
    """Top-1 and held-out error of no QDrop against QDrop, each as a mean over seeds (standard error)."""
    def log_ratio(a: dict, b: dict) -> float:
        return math.log(b["final_error"] / a["final_error"])

    top1 = [off["top1"] - on["top1"] for on, off in pairs]
    first = [log_ratio(first_attention(on), first_attention(off)) for on, off in pairs]
    every = [statistics.mean(log_ratio(a, b) for a, b in zip(on["modules"], off["modules"])) for on, off in pairs]
    lower = [statistics.mean(float(log_ratio(a, b) < 0) for a, b in zip(on["modules"], off["modules"]))
             for on, off in pairs]
    last = [log_ratio(on["modules"][-1], off["modules"][-1]) for on, off in pairs]
    return (f"| {model} | W{bits}A{bits} | {len(pairs)} | {mean_se(top1)} | {mean_se(first)} | {mean_se(every)} | "
            f"{statistics.mean(lower) * 100:.0f} % | {mean_se(last)} |")


def main() -> int:
    pairs = paired_runs()
    lines = ["# QDrop on or off, by held-out module error", "", "Produced by `python bench/qdrop_heldout.py` (reads "
             "the runs already made, at 200 it/module). Each column is *without QDrop minus with it*, the mean over "
             "seeds of a seed-by-seed difference, its standard error in brackets. Held-out errors are compared as "
             "log ratios (−0.10: about 10 % lower without QDrop). DeiT W4A4's runs without QDrop on seeds 3-10 ran "
             "on this CPU and their QDrop pairs on an H200, so those pairs also carry the device drift.", "",
             "| model | bits | seeds | Δ Top-1 | Δ log held-out error, first attention block (same inputs) | "
             "Δ log held-out error, mean over modules | modules lower without QDrop | Δ log held-out error, last "
             "module |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [row(model, bits, runs) for (model, bits), runs in pairs.items()]
    atomic_write(RESULTS / "qdrop_heldout.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
