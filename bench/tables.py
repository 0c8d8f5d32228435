"""What every results table is made of: the results files' runs, picked by cell and seed, and their numbers
(mean ± std over seeds, paired differences with their standard error) as Markdown. No torch import."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = (REPO / "README.md", REPO / "docs" / "results.md")

MODELS = ("vit_cifar", "deit_cifar", "swin_cifar")
VARIANTS = tuple(f"{m}_outliers" for m in MODELS)
LABELS = {"fp": "FP32", "minmax": "MinMax", "percentile": "Percentile", "adfq_init": "ADFQ, no reconstruction"}
#: the shipped CIFAR-10 W4A4 configs' recipe: 1,000 iterations per module, on DeiT and Swin step sizes at 1.2e-4
RECIPE_ITERS = 1000
RECIPE_CHANGES = {"vit_cifar": {}, "deit_cifar": {"scale_lr": 1.2e-4}, "swin_cifar": {"scale_lr": 1.2e-4}}
#: the W6A6 configs' budget, and the budget of the ablation and stress groups
SHORT_ITERS = 200
ABLATIONS = (("no_ppoq", {"ppoq": False}, "w/o PPOQ"), ("no_slq", {"slq": False}, "w/o SLQ"),
             ("no_log_softmax", {"log_softmax": False}, "w/o log-√2 softmax"),
             ("no_attn_kl", {"attn_kl": False}, "w/o attention KL"), ("no_qdrop", {"qdrop_prob": 1.0}, "w/o QDrop"))
NO_BC = {"bias_correction": False}
ACC = "python -m bench accuracy"


# -- runs and numbers -----------------------------------------------------------------------------------------

def load(name: str) -> dict:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def key(r: dict) -> str:
    return json.dumps([r.get(k) for k in ("model", "preset", "w_bits", "changes", "iters", "seed", "threads")],
                      sort_keys=True)


def accuracy_runs(data: dict, threads: int = 1) -> list[dict]:
    """Each cell and seed once (the first recorded), at ``threads`` threads."""
    seen, runs = set(), []
    for r in data["runs"]:
        if r["threads"] == threads and key(r) not in seen:
            seen.add(key(r))
            runs.append(r)
    return runs


def pick(runs: list[dict], model: str, preset: str, bits: Optional[int] = None, iters: int = 0,
         changes: Optional[dict] = None) -> list[dict]:
    changes = changes or {}
    return [r for r in runs if r["model"] == model and r["preset"] == preset and r["iters"] == iters
            and (preset == "fp" or r["w_bits"] == bits) and r["changes"] == changes]


def recipe(model: str, bits: int) -> tuple[int, dict]:
    """(iterations, changes) of the shipped config's recipe for ``model`` (or its outlier variant)."""
    if bits >= 5:
        return SHORT_ITERS, {}
    return RECIPE_ITERS, RECIPE_CHANGES[model.removesuffix("_outliers")]


def mean_std(values: list[float]) -> Optional[tuple[float, float]]:
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(runs: list[dict], field: str = "top1", fmt: str = ".2f") -> str:
    s = mean_std([r[field] for r in runs if r.get(field) is not None])
    if s is None:
        return "–"
    return f"{s[0]:{fmt}}" if len(runs) == 1 else f"{s[0]:{fmt}} ± {s[1]:{fmt}}"


def mean(runs: list[dict], field: str = "top1") -> Optional[float]:
    values = [r[field] for r in runs if r.get(field) is not None]
    return statistics.mean(values) if values else None


def by_seed(runs: list[dict]) -> dict:
    return {r["seed"]: r for r in runs}


def paired(a: list[dict], b: list[dict], field: str = "top1") -> Optional[tuple[float, float, int]]:
    """Mean of b − a over the seeds both ran, its standard error, and how many seeds."""
    sa, sb = by_seed(a), by_seed(b)
    diffs = [sb[s][field] - sa[s][field] for s in sorted(set(sa) & set(sb))]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, len(diffs)


def share(init: list[dict], short: list[dict], full: list[dict], field: str) -> str:
    """What the short budget gains over no reconstruction, as a share of what the full budget gains, on the
    seeds all three ran (for KL, the share of the reduction)."""
    seeds = set(by_seed(init)) & set(by_seed(short)) & set(by_seed(full))
    if not seeds:
        return "–"
    m = lambda runs: statistics.mean(by_seed(runs)[s][field] for s in seeds)  # noqa: E731
    gain_short, gain_full = m(short) - m(init), m(full) - m(init)
    return "–" if gain_full == 0 else f"{100 * gain_short / gain_full:.0f} %"


def signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def seed_counts(runs: list[dict]) -> str:
    counts = sorted({len(rs) for rs in runs if rs})
    if not counts:
        return "–"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def machines(runs: list[dict]) -> str:
    """The machines that made ``runs``, most runs first."""
    def name(m: dict) -> str:
        if not m:
            return "a machine not recorded"
        torch = str(m.get("torch", "?")).split("+")[0]
        gpu = f", {m['gpu']}" if m.get("gpu") else ""
        return f"{m.get('cpu_count')}-core {m.get('cpu_model')} CPU{gpu}, torch {torch}"
    counts = Counter(name(r.get("machine", {})) for r in runs)
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{n} ({c} runs)" for n, c in counts.most_common())


def about(command: str, runs: list[dict], seeds: str, extra: str = "") -> str:
    """The line under every accuracy table: how to regenerate it, where it ran, seeds and spread."""
    return (f"*Regenerate: `{command}`. Machine: {machines(runs)}; one thread per run. Seeds: {seeds} per cell "
            f"(mean ± std over calibration seeds).{(' ' + extra) if extra else ''}*")


def table(header: list[str], rows: list[list[str]], align: Optional[list[str]] = None) -> list[str]:
    align = align or ["---"] * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def model_figure():
    """(pyplot, figure, one axis per model), or None where matplotlib is not installed: plots are optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4.2), squeeze=False)
    return plt, fig, axes[0]


def save_figure(plt, fig, axes, path: Path, title: str, xlabel: str) -> None:
    """Label every model's axis, title the figure and write it atomically."""
    for ax, model in zip(axes, MODELS):
        ax.set_title(model)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
