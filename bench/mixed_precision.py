"""The mixed-precision results: each bit budget against the uniform widths around it, paired by seed, and the
plot of Top-1 against the size of the quantized weights."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

from tables import (ACC, MODELS, RECIPE_ITERS, VARIANTS, about, accuracy_runs, by_seed, cell, load, mean,
                    mean_std, model_figure, paired, pick, save_figure, seed_counts, signed, table)

#: the budgets measured, by tag: (BitBudget fields, the uniform width it is set against)
BUDGETS = {
    "mixed_3.0_2bit": ({"w_bits": 3.0, "a_bits": 3.0, "candidates": [2, 3, 4, 6, 8]}, "W3A3, 2-bit candidates"),
    "mixed_3.5": ({"w_bits": 3.5, "a_bits": 3.5}, "W3.5A3.5"),
    "mixed_4.0": ({"w_bits": 4.0, "a_bits": 4.0}, "W4A4"),
}
#: modules the default ``overrides`` keep at 8 bits, outside the budget
FIXED_AT_8 = ("patch_embed.*", "head", "head.*", "head_dist")


def budget_runs(runs: list[dict], model: str, tag: str) -> list[dict]:
    return pick(runs, model, "adfq", 4, RECIPE_ITERS, {"bit_budget": BUDGETS[tag][0]})


def mixed_table(runs: list[dict], field: str = "top1") -> list[str]:
    """Each budget's Top-1 against uniform W3A3 and W4A4 on the same calibration seeds (1,000 it/module, the
    paper's step-size rate for all), and what the allocation cost next to the calibration. ``field``
    ``"unseen_top1"``: the same on the unseen training images, for the runs scored there."""
    runs = [r for r in runs if r.get(field) is not None]
    rows, used, counts = [], [], []
    for model in MODELS + VARIANTS:
        for tag, (budget, label) in BUDGETS.items():
            mixed = budget_runs(runs, model, tag)
            if not mixed:
                continue
            seeds = set(by_seed(mixed))
            low, high = ([r for r in pick(runs, model, "adfq", b, RECIPE_ITERS) if r["seed"] in seeds] for b in (3, 4))
            used += mixed + low + high
            counts.append(mixed)
            d_low, d_high = paired(low, mixed, field), paired(high, mixed, field)
            gap = "–"
            if tag == "mixed_3.5" and low and high:
                gap = f"{100 * (mean(mixed, field) - mean(low, field)) / (mean(high, field) - mean(low, field)):.0f} %"
            cost = [r["allocation_seconds"] / (r["calib_seconds"] - r["allocation_seconds"]) for r in mixed
                    if r.get("allocation_seconds")]
            rows.append([f"`{model}`", label, str(len(mixed)), cell(low, field), cell(mixed, field),
                         cell(high, field), _difference(d_low), _difference(d_high), gap, _kl_change(high, mixed),
                         f"{100 * sum(cost) / len(cost):.0f} %" if cost else "–"])
    lines = table(["model", "budget", "seeds", "uniform W3A3", "mixed", "uniform W4A4", "Δ to W3A3 (seed SE)",
                   "Δ to W4A4 (seed SE)", "W3A3 → W4A4 gap recovered", "KL to FP32 against W4A4 (val)",
                   "allocation / calibration time"], rows,
                  ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])
    if field == "unseen_top1":
        fp = ", ".join(f"{m} {mean(pick(runs, m, 'fp'), field):.2f}" for m in MODELS if pick(runs, m, "fp"))
        return lines + ["", about(f"{ACC} --groups budget --bits 3 4 --budget-iters 1000 --seeds 0 1 2 --unseen "
                                  "--models vit_cifar", used,
                                  seed_counts(counts),
                                  "Mixed runs: the mixed-precision command with `--unseen --models vit_cifar`. "
                                  "Top-1 on the 35,746 training-part images no calibration seed 0-9 "
                                  f"draws (FP32 there: {fp}); the 5,000 validation images, above.")]
    return lines + ["", about(f"{ACC} --groups budget --bits 4 --budget-iters 1000 --seeds 0 1 2 --changes "
                              "'{\"bit_budget\": {\"w_bits\": 3.5, \"a_bits\": 3.5}}' --tag mixed_3.5", used,
                              seed_counts(counts),
                              "The other budgets: the same command with their `bit_budget` and tag (`mixed_4.0`; "
                              "`mixed_3.0_2bit` with `\"candidates\": [2, 3, 4, 6, 8]`); the outlier variants: "
                              "`--groups stress_budget`. Uniform runs: the default "
                              "recipe at 1,000 it/module on the same seeds; Δ: the paired difference with its "
                              "standard error over seeds; KL: the paired change of the mean KL(FP32 ‖ quantized) of "
                              "the logits on the validation images, relative to uniform W4A4's.")]


def _kl_change(uniform: list[dict], mixed: list[dict]) -> str:
    """The paired change of KL to FP32 from ``uniform`` to ``mixed``, relative to uniform's, with its seed SE."""
    d = paired(uniform, mixed, "kl_to_fp")
    if d is None:
        return "–"
    change, se = (100 * x / mean(uniform, "kl_to_fp") for x in d[:2])
    return f"{change:+.0f} %".replace("-", "−") + (f" ({se:.0f})" if d[2] > 1 else "")


def _difference(d) -> str:
    """A paired difference with its seed standard error (none from one seed)."""
    if d is None:
        return "–"
    return f"{signed(d[0])} ({d[1]:.2f})" if d[2] > 1 else signed(d[0])


def weight_megabytes(model: str, bits: int, allocated: dict) -> float:
    """Storage of the quantized Linear/Conv weights at their widths (patch embedding and head at 8 bits)."""
    from torch import nn

    from adfq_lightning.zoo import create_reference_model

    total = 0.0
    for name, m in create_reference_model(model, pretrained=False).named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            width = 8 if any(fnmatchcase(name, p) for p in FIXED_AT_8) else allocated.get(name, {}).get("w_bits", bits)
            total += m.weight.numel() * width / 8
    return total / 2**20


def render_pareto(path: Path) -> None:
    """Top-1 against the quantized weights' size: uniform W3A3, W4A4, W6A6 and each budget, mean ± std over
    seeds (torch is imported here only, to count each layer's weights)."""
    figure = model_figure()
    if figure is None:
        return
    plt, fig, axes = figure
    runs = accuracy_runs(load("accuracy.json"))
    for ax, model in zip(axes, MODELS):
        uniform = [(b, pick(runs, model, "adfq", b, RECIPE_ITERS if b < 6 else 200)) for b in (3, 4, 6)]
        points = [(weight_megabytes(model, b, {}), mean_std([r["top1"] for r in rs])) for b, rs in uniform if rs]
        if points:
            ax.errorbar([x for x, _ in points], [s[0] for _, s in points],
                        yerr=[s[1] for _, s in points], marker="o", capsize=3,
                        label="uniform W3A3, W4A4 (1,000 it), W6A6 (200 it)")
        for colour, (tag, (_, label)) in zip(("tab:orange", "tab:green", "tab:red"), BUDGETS.items()):
            mixed = budget_runs(runs, model, tag)
            if mixed:
                sizes = [weight_megabytes(model, 4, r["allocated"]) for r in mixed]
                top1 = mean_std([r["top1"] for r in mixed])
                ax.errorbar([sum(sizes) / len(sizes)], [top1[0]], yerr=[top1[1]],
                            marker="s", capsize=3, linestyle="none", color=colour, label=f"mixed, budget {label}")
    save_figure(plt, fig, axes, path, "Top-1 vs size, CIFAR-10 (5,000 val images), ADFQ, mean ± std over seeds",
                "quantized weights (MiB)")
