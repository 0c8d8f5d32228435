"""Every results table, rendered from the results files: ``bench/results/*.md``, and the blocks between
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md and docs/results.md.

    python -m bench report            # rewrite them (and the plot)
    python -m bench report --check    # exit 1, naming them, if any differs from what the results files give

It reads ``accuracy.json``, ``speed.json``, ``cuda_graphs.json`` and ``export.json`` in ``bench/results`` and
imports neither torch nor the package, so ``--check`` runs in a second.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

from mixed_precision import mixed_table, render_pareto
from paired_tables import adaptive_table, compiled_table, step_size_table
from speed_tables import calibration_time_line, cuda_graphs_table, export_tables, speed_table, timing_table
from tables import (ABLATIONS, ACC, DOCS, LABELS, MODELS, NO_BC, RECIPE_ITERS, REPO, RESULTS, SHORT_ITERS, VARIANTS,
                    about, accuracy_runs, by_seed, cell, load, mean, mean_std, model_figure, paired, pick,
                    recipe, save_figure, seed_counts, share, signed, table)


# -- accuracy tables ---------------------------------------------------------------------------------------------

def accuracy_table(runs: list[dict]) -> list[str]:
    """README: the three reference models at W4A4 and W3A3."""
    rows, used, counts = [], [], []
    for model in MODELS:
        fp = pick(runs, model, "fp")
        for bits in (4, 3):
            iters, changes = recipe(model, bits)
            cells = [pick(runs, model, p, bits) for p in ("minmax", "percentile")]
            adfq = pick(runs, model, "adfq", bits, iters, changes)
            used += fp + adfq + cells[0] + cells[1]
            counts.append(adfq)
            rows.append([f"`{model}`", f"W{bits}A{bits}", cell(fp), cell(cells[0]), cell(cells[1]),
                         f"**{cell(adfq)}**", str(len(adfq))])
    lines = table(["model", "bits", "FP32", "MinMax", "Percentile", "ADFQ", "seeds"], rows,
                  ["---", "---", "---:", "---:", "---:", "---:", "---:"])
    return lines + ["", about(f"{ACC} --groups bits budget --bits 3 4 --budget-iters 1000 --seeds 0 1 2 3 4; "
                              f"{ACC} --groups budget --bits 3 4 --budget-iters 1000 --models deit_cifar swin_cifar "
                              "--changes '{\"scale_lr\": 1.2e-4}' --tag scale_lr_x3", used, seed_counts(counts),
                              "Top-1 % on the 5,000 validation images; MinMax and Percentile are per-tensor; ADFQ "
                              "is the shipped W4A4 configs' recipe (1,000 iterations per module; step sizes at "
                              "1.2e-4 on DeiT and Swin).")]


def bits_table(runs: list[dict]) -> list[str]:
    lines, used, counts = [], [], []
    widths = (3, 4, 5, 6, 7, 8)
    for model in MODELS:
        rows = [["FP32"] + [cell(pick(runs, model, "fp"))] * len(widths)]
        used += pick(runs, model, "fp")
        for preset in ("minmax", "percentile", "adfq_init"):
            cells = [pick(runs, model, preset, b) for b in widths]
            used += [r for c in cells for r in c]
            counts += cells
            rows.append([LABELS[preset]] + [cell(c) for c in cells])
        adfq = [pick(runs, model, "adfq", b, *recipe(model, b)) for b in widths]
        used += [r for c in adfq for r in c]
        rows.append(["ADFQ, shipped recipe"] + [cell(c) for c in adfq])
        rows.append(["seeds (no reconstruction / recipe)"]
                    + [f"{len(pick(runs, model, 'adfq_init', b))} / {len(a)}" if a else
                       str(len(pick(runs, model, "adfq_init", b))) for b, a in zip(widths, adfq)])
        lines += [f"**{model}**", ""] + table([model] + [f"W{b}A{b}" for b in widths], rows,
                                               ["---"] + ["---:"] * len(widths)) + [""]
    return lines + [about(f"{ACC} --groups bits adfq budget --seeds 0 1 2 (and --bits 6 7 8 --seeds 3 4 5 6 7 8 9 "
                          "where the methods tie)", used, seed_counts(counts),
                          "The shipped recipe: 1,000 iterations per module at W3A3 and W4A4 (step sizes at 1.2e-4 on "
                          "DeiT and Swin), 200 at W6A6.")]


def budget_table(runs: list[dict], models=MODELS, groups: str = "budget") -> list[str]:
    rows, used, counts = [], [], []
    for model in models:
        for bits in (3, 4):
            init = pick(runs, model, "adfq_init", bits)
            budgets = [pick(runs, model, "adfq", bits, it) for it in (100, 200, 1000)]
            rate = pick(runs, model, "adfq", bits, 1000, {"scale_lr": 1.2e-4})
            full = pick(runs, model, "adfq", bits, 3000)
            iters, changes = recipe(model, bits)
            rec = pick(runs, model, "adfq", bits, iters, changes)
            used += init + rate + full + [r for b in budgets for r in b]
            counts += [init, full, rec]
            secs = [statistics.median(r["calib_seconds"] for r in rs) if rs else None for rs in (rec, full)]
            speed = f"{secs[0]:.0f} / {secs[1]:.0f}" if None not in secs else "–"
            rows.append([f"`{model}`", f"W{bits}A{bits}", cell(init)] + [cell(b) for b in budgets]
                        + [cell(rate), cell(full), share(init, rec, full, "top1"), share(init, rec, full, "kl_to_fp"),
                           speed])
    header = ["model", "bits", "no reconstruction", "100 it", "200 it", "1,000 it", "1,000 it, step sizes 1.2e-4",
              "3,000 it", "recipe: share of the 3,000-it Top-1 gain", "… of its KL reduction",
              "calibration s, recipe / 3,000 it"]
    lines = table(header, rows, ["---", "---"] + ["---:"] * (len(header) - 2))
    first = "bits budget" if groups == "budget" else "stress stress_budget"
    short = "adfq" if groups == "budget" else "stress"
    return lines + ["", about(f"{ACC} --groups {first} --bits 3 4 --budget-iters 100 1000 3000 --seeds 0 1 2 "
                              f"(200 it: --groups {short}; step sizes at 1.2e-4: --groups {groups} --budget-iters 1000 "
                              "--changes '{\"scale_lr\": 1.2e-4}' --tag scale_lr_x3)", used, seed_counts(counts),
                              "3,000 it ran on seeds 0-2 (five where noted by the seed count). Shares are taken on "
                              "the seeds all three budgets ran; the recipe is the 1,000-it column the model's config "
                              "uses. Calibration seconds: median, two runs sharing two cores.")]


def ablation_table(runs: list[dict], base: dict, with_bias_correction: bool) -> list[str]:
    rows, used, counts = [], [], []
    columns = list(ABLATIONS) + ([("no_bias_correction", NO_BC, "w/o bias correction")] if with_bias_correction else [])
    for model in MODELS:
        for bits in (4, 3):
            full = pick(runs, model, "adfq", bits, SHORT_ITERS, base)
            used += full
            counts.append(full)
            row = [f"`{model}`", f"W{bits}A{bits}", cell(full)]
            for _, changes, _ in columns:
                off = pick(runs, model, "adfq", bits, SHORT_ITERS, {**base, **changes})
                used += off
                if not off or not full:
                    row.append("–")
                    continue
                delta = mean(off) - mean(full)
                spread = max(mean_std([r["top1"] for r in full])[1], mean_std([r["top1"] for r in off])[1])
                mark = f"**{signed(delta)}**" if abs(delta) > spread else signed(delta)
                row.append(f"{cell(off)} ({mark})")
            rows.append(row)
    header = ["model", "bits", "full ADFQ"] + [label for _, _, label in columns]
    lines = table(header, rows, ["---", "---"] + ["---:"] * (len(header) - 2))
    changes = f" --changes '{json.dumps(base)}' --tag no_bias_correction" if base else ""
    return lines + ["", about(f"{ACC} --groups ablation adfq --bits 3 4 --seeds 0 1 2{changes}", used,
                              seed_counts(counts),
                              f"Full ADFQ at {SHORT_ITERS} iterations per module with one component off; in brackets "
                              "the difference to full ADFQ, in bold where it is larger than the larger of the two "
                              "stds.")]


def ppoq_table(runs: list[dict]) -> list[str]:
    rows, used, counts = [], [], []
    for v in VARIANTS:
        for bits in (4, 3):
            cells = [pick(runs, v, "adfq", bits, SHORT_ITERS), pick(runs, v, "adfq", bits, SHORT_ITERS, {"ppoq": False}),
                     pick(runs, v, "adfq_init", bits), pick(runs, v, "adfq_init", bits, 0, {"ppoq": False})]
            used += [r for c in cells for r in c]
            counts += cells
            rows.append([f"`{v}`", f"W{bits}A{bits}"] + [cell(c) for c in cells])
    lines = table(["variant", "bits", f"ADFQ, {SHORT_ITERS} it", "… w/o PPOQ", "ADFQ, no reconstruction",
                   "… w/o PPOQ"], rows, ["---", "---", "---:", "---:", "---:", "---:"])
    return lines + ["", about(f"{ACC} --groups ablation stress --bits 3 4 --seeds 0 1 2", used, seed_counts(counts))]


def bias_correction_table(runs: list[dict]) -> list[str]:
    rows, used, counts = [], [], []
    cells = [(m, b, 0) for m in MODELS for b in (3, 4, 5, 6, 7, 8)] + [(m, b, RECIPE_ITERS) for m in MODELS for b in (3, 4)]
    cells += [(v, b, it) for v in VARIANTS for b in (3, 4) for it in (0, RECIPE_ITERS)]
    for model, bits, iters in cells:
        preset = "adfq" if iters else "adfq_init"
        on, off = pick(runs, model, preset, bits, iters), pick(runs, model, preset, bits, iters, NO_BC)
        d = paired(off, on)
        if d is None:
            continue
        seeds = set(by_seed(on)) & set(by_seed(off))
        on, off = [r for r in on if r["seed"] in seeds], [r for r in off if r["seed"] in seeds]
        used += on + off
        counts.append(on)
        kl_off, kl_on = mean(off, "kl_to_fp"), mean(on, "kl_to_fp")
        corrected = mean(on, "modules_bias_corrected")
        total = mean(on, "modules")
        rows.append([f"`{model}`", f"W{bits}A{bits}", f"{iters} it" if iters else "none", str(d[2]),
                     f"{cell(off)} → {cell(on)}", f"{signed(d[0])} ({d[1]:.2f})",
                     f"{kl_off:.4f} → {kl_on:.4f} ({100 * (kl_on - kl_off) / kl_off:+.0f} %)",
                     f"{corrected:.1f} of {total:.0f}" if corrected is not None else "–"])
    lines = table(["model", "bits", "reconstruction", "seeds", "Top-1 without → with", "Δ Top-1 (seed SE)",
                   "KL to FP32 without → with", "modules corrected"], rows,
                  ["---", "---", "---", "---:", "---:", "---:", "---:", "---:"])
    return lines + ["", about(f"{ACC} --groups bits budget stress_budget --budget-iters 1000 --changes "
                              "'{\"bias_correction\": false}' --tag no_bias_correction", used, seed_counts(counts),
                              "Each seed with and without bias correction on the same calibration images; Δ is the "
                              "paired difference, with its standard error over seeds.")]


def qkv_grid_table(runs: list[dict]) -> list[str]:
    rows, used, counts = [], [], []
    for model in MODELS:
        for bits in (4, 6, 8):
            l2 = pick(runs, model, "adfq_init", bits, 0, {"qkv_error_p": 2.0})
            if not l2:
                continue
            seeds = set(by_seed(l2))
            l24 = [r for r in pick(runs, model, "adfq_init", bits) if r["seed"] in seeds]
            used += l2 + l24
            counts.append(l2)
            d = paired(l2, l24)
            rows.append([f"`{model}`", f"W{bits}A{bits}", cell(l24), cell(l2), signed(d[0]) if d else "–",
                         cell(l24, "kl_to_fp", ".4f"), cell(l2, "kl_to_fp", ".4f")])
    lines = table(["model", "bits", "Top-1, L2.4 (default)", "Top-1, squared error", "Δ Top-1", "KL to FP32, L2.4",
                   "KL to FP32, squared error"], rows, ["---", "---"] + ["---:"] * 5)
    return lines + ["", about(f"{ACC} --groups qkv_grid --models vit_cifar deit_cifar --bits 4 6 8 --seeds 0 1 2",
                              used, seed_counts(counts), "ADFQ without reconstruction, the same calibration images "
                              "both ways.")]


def stress_table(runs: list[dict]) -> list[str]:
    rows, used, counts = [], [], []
    for v in VARIANTS:
        fp = pick(runs, v, "fp")
        for bits in (4, 3):
            iters, changes = recipe(v, bits)
            cells = [pick(runs, v, p, bits) for p in ("minmax", "percentile", "adfq_init")]
            cells += [pick(runs, v, "adfq", bits, it) for it in (100, 200)]
            cells += [pick(runs, v, "adfq", bits, iters, changes), pick(runs, v, "adfq", bits, 3000)]
            used += fp + [r for c in cells for r in c]
            counts += cells
            rows.append([f"`{v}`", f"W{bits}A{bits}", cell(fp)] + [cell(c) for c in cells])
    lines = table(["variant", "bits", "FP32", "MinMax", "Percentile", "ADFQ, no reconstruction", "100 it", "200 it",
                   "1,000 it (recipe)", "3,000 it"], rows, ["---", "---"] + ["---:"] * 8)
    return lines + ["", about(f"{ACC} --groups stress stress_budget --bits 3 4 --seeds 0 1 2", used,
                              seed_counts(counts), "The recipe column is the base model's config recipe.")]


# -- rendering ---------------------------------------------------------------------------------------------------

def blocks() -> dict[str, list[str]]:
    data = load("accuracy.json")
    runs = accuracy_runs(data)
    speed, graphs, export = load("speed.json"), load("cuda_graphs.json"), load("export.json")
    export = export if "sizes" in export else {}
    return {
        "accuracy": accuracy_table(runs),
        "calibration_time": calibration_time_line(speed),
        "bits": bits_table(runs),
        "budget": budget_table(runs),
        "step_size_rate": step_size_table(runs),
        "ablation": ablation_table(runs, {}, with_bias_correction=True),
        "ablation_no_bias_correction": ablation_table(runs, NO_BC, with_bias_correction=False),
        "ppoq": ppoq_table(runs),
        "bias_correction": bias_correction_table(runs),
        "qkv_grid": qkv_grid_table(runs),
        "compiled": compiled_table(runs),
        "mixed": mixed_table(runs),
        "mixed_unseen": mixed_table(runs, "unseen_top1"),
        "adaptive": adaptive_table(runs, data["runs"]),
        "stress": stress_table(runs),
        "stress_budget": budget_table(runs, VARIANTS, "stress_budget"),
        "timing": timing_table(data),
        "speed_cpu": speed_table(speed, gpu=False),
        "speed_gpu": speed_table(speed, gpu=True),
        "cuda_graphs": cuda_graphs_table(graphs),
        "export": export_tables(export),
    }


#: the results files' own Markdown: title, then the blocks in order
RESULT_PAGES = {
    "accuracy.md": ("Accuracy (CIFAR-10 reference models)", {
        "accuracy": "W4A4 and W3A3", "bits": "Every bit width", "budget": "Reconstruction budget",
        "step_size_rate": "Step-size rate at 1,000 iterations",
        "ablation": "Ablation", "ablation_no_bias_correction": "Ablation with `bias_correction: false`",
        "ppoq": "PPOQ on the outlier variants", "bias_correction": "Bias correction",
        "qkv_grid": "q/k/v grid error", "compiled": "Compiled iterations",
        "mixed": "Mixed precision",
        "mixed_unseen": "Mixed precision on the unseen training images", "adaptive": "Adaptive budget", "stress": "Outlier variants", "stress_budget": "Outlier variants by budget",
        "timing": "Calibration time and memory"}),
    "speed.md": ("Calibration speed at real sizes", {
        "calibration_time": "In one line", "speed_cpu": "CPU", "speed_gpu": "GPU", "cuda_graphs": "CUDA graphs"}),
    "export.md": ("Export", {"export": "The shipped W4A4 ViT, every format"}),
}


def render_page(title: str, sections: dict, rendered: dict) -> str:
    lines = [f"# {title}", "", "Rendered by `python -m bench report` from the JSON files beside this one.", ""]
    for name, heading in sections.items():
        lines += [f"## {heading}", ""] + rendered[name] + [""]
    return "\n".join(lines).rstrip() + "\n"


MARKER = re.compile(r"(<!-- results:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def fill_markers(text: str, rendered: dict) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in rendered:
            raise KeyError(f"unknown results block {name!r}")
        return m.group(1) + "\n".join(rendered[name]) + "\n" + m.group(4)
    return MARKER.sub(sub, text)


def outputs() -> dict[Path, str]:
    rendered = blocks()
    out = {RESULTS / name: render_page(title, sections, rendered) for name, (title, sections) in RESULT_PAGES.items()}
    for path in DOCS:
        if path.is_file():
            out[path] = fill_markers(path.read_text(), rendered)
    return out


def render_plot(path: Path) -> None:
    figure = model_figure()
    if figure is None:
        return
    plt, fig, axes = figure
    runs = accuracy_runs(load("accuracy.json"))
    widths = (3, 4, 5, 6, 7, 8)
    for ax, model in zip(axes, MODELS):
        series = [(LABELS[p], lambda b, p=p: pick(runs, model, p, b)) for p in ("minmax", "percentile", "adfq_init")]
        series.append(("ADFQ, shipped recipe", lambda b: pick(runs, model, "adfq", b, *recipe(model, b))))
        for label, get in series:
            points = [(b, mean_std([r["top1"] for r in get(b)])) for b in widths]
            points = [(b, s) for b, s in points if s]
            ax.errorbar([b for b, _ in points], [s[0] for _, s in points], yerr=[s[1] for _, s in points],
                        marker="o", capsize=3, label=label)
        fp = mean(pick(runs, model, "fp"))
        if fp is not None:
            ax.axhline(fp, color="k", linestyle="--", linewidth=1, label=f"FP32 ({fp:.1f})")
    save_figure(plt, fig, axes, path, "Top-1 vs bits, CIFAR-10 (5,000 val images), mean ± std over seeds",
                "bits (W = A)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming every file whose tables differ from the results files")
    args = p.parse_args(argv)
    out = outputs()
    stale = [path for path, text in out.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO)} (run python -m bench report)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(out[path])
        os.replace(tmp, path)
        print(f"wrote {path.relative_to(REPO)}")
    render_plot(RESULTS / "top1_vs_bits.png")
    render_pareto(RESULTS / "top1_vs_size.png")
    return 0
