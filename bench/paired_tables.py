"""Tables of a setting against the default recipe at 1,000 it/module, paired by calibration seed: the
step-size rate, compiled iterations and the adaptive budget."""

from __future__ import annotations

from tables import (ACC, MODELS, RECIPE_ITERS, VARIANTS, about, by_seed, cell, mean, paired, pick, seed_counts,
                    signed, table)


def paired_with_default(runs: list[dict], models: tuple, changes: dict) -> list[tuple[str, int, list, list]]:
    """(model, bits, default runs, runs with ``changes``) at the recipe's 1,000 it/module, on the seeds both ran."""
    found = []
    for model in models:
        for bits in (3, 4):
            base = pick(runs, model, "adfq", bits, RECIPE_ITERS)
            other = pick(runs, model, "adfq", bits, RECIPE_ITERS, changes)
            seeds = set(by_seed(base)) & set(by_seed(other))
            if seeds:
                found.append((model, bits, [r for r in base if r["seed"] in seeds],
                              [r for r in other if r["seed"] in seeds]))
    return found


def step_size_table(runs: list[dict]) -> list[str]:
    """1,000 it/module with the step sizes at 1.2e-4 against the paper's 4e-5, seed by seed."""
    rows, used, counts = [], [], []
    for model, bits, paper, fast in paired_with_default(runs, MODELS + VARIANTS, {"scale_lr": 1.2e-4}):
        used += paper + fast
        counts.append(fast)
        d = paired(paper, fast)
        rows.append([f"`{model}`", f"W{bits}A{bits}", str(len(fast)), f"{mean(paper):.2f} → {mean(fast):.2f}",
                     f"{signed(d[0])} ({d[1]:.2f})",
                     f"{mean(paper, 'kl_to_fp'):.4f} → {mean(fast, 'kl_to_fp'):.4f}",
                     f"{mean(paper, 'heldout_error_ratio'):.3f} → {mean(fast, 'heldout_error_ratio'):.3f}"])
    lines = table(["model", "bits", "seeds", "Top-1: 4e-5 → 1.2e-4", "Δ Top-1 (seed SE)", "KL to FP32",
                   "held-out module error after / before reconstruction"], rows,
                  ["---", "---", "---:", "---:", "---:", "---:", "---:"])
    return lines + ["", about(f"{ACC} --groups budget stress_budget --bits 3 4 --budget-iters 1000 --changes "
                              "'{\"scale_lr\": 1.2e-4}' --tag scale_lr_x3", used, seed_counts(counts),
                              "Held-out module error: each module's output error on the 10 % of calibration images "
                              "no update sees, after reconstruction over before it; geometric mean over modules, "
                              "mean over seeds (lower is better).")]


def compiled_table(runs: list[dict]) -> list[str]:
    """Reconstruction with ``torch_compile`` against eager iterations, at 1,000 it/module, seed by seed."""
    rows, used, counts = [], [], []
    for model, bits, eager, compiled in paired_with_default(runs, MODELS, {"torch_compile": True}):
        used += eager + compiled
        counts.append(compiled)
        d = paired(eager, compiled)
        rows.append([f"`{model}`", f"W{bits}A{bits}", str(len(compiled)), cell(eager), cell(compiled),
                     f"{signed(d[0])} ({d[1]:.2f})",
                     f"{mean(eager, 'kl_to_fp'):.4f} → {mean(compiled, 'kl_to_fp'):.4f}"])
    lines = table(["model", "bits", "seeds", "Top-1 eager", "Top-1 compiled", "Δ Top-1 (seed SE)", "KL to FP32"],
                  rows, ["---", "---", "---:", "---:", "---:", "---:", "---:"])
    return lines + ["", about(f"{ACC} --groups budget --bits 3 4 --budget-iters 1000 --seeds 0 1 2 --changes "
                              "'{\"torch_compile\": true}' --tag compiled", used, seed_counts(counts),
                              "Both at the library's default recipe (step sizes at 4e-5); compiled: every target's "
                              "forward and backward through torch.compile (Inductor).")]


#: tags of the fixed and the adaptive run timed side by side
SIDE_BY_SIDE = ("side_by_side", "side_by_side_adaptive")


def adaptive_table(runs: list[dict], every_run: list[dict]) -> list[str]:
    """``adaptive_iters`` against the fixed 1,000 it/module, seed by seed: Top-1, iterations used, time; and the
    two timed side by side (in ``every_run``: ``runs`` holds each cell and seed once)."""
    rows, used, counts = [], [], []
    for model, bits, fixed, adaptive in paired_with_default(runs, MODELS + VARIANTS, {"adaptive_iters": True}):
        used += fixed + adaptive
        counts.append(adaptive)
        d = paired(fixed, adaptive)
        share = mean([dict(r, share=r["iters_used"] / (r["modules"] * RECIPE_ITERS)) for r in adaptive], "share")
        rows.append([f"`{model}`", f"W{bits}A{bits}", str(len(adaptive)), cell(fixed), cell(adaptive),
                     f"{signed(d[0])} ({d[1]:.2f})", f"{100 * share:.0f} %"])
    lines = table(["model", "bits", "seeds", "Top-1 fixed 1,000 it", "Top-1 adaptive", "Δ Top-1 (seed SE)",
                   "iterations used"], rows, ["---", "---", "---:", "---:", "---:", "---:", "---:"])
    for model in MODELS:  # the time side by side: the two runs at once, one core each, nothing else running
        pair = [[r for r in every_run if r["model"] == model and r["tag"] == tag] for tag in SIDE_BY_SIDE]
        if all(pair):
            fixed, adaptive = pair[0][0], pair[1][0]
            lines += ["", f"Side by side on `{model}` (W3A3, seed {fixed['seed']}; the two runs at once, one core "
                          f"each, nothing else running: `{ACC} --groups budget --bits 3 --budget-iters 1000 "
                          f"--models {model} --seeds 0 --tag {SIDE_BY_SIDE[0]}`, and the same with `--changes "
                          f"'{{\"adaptive_iters\": true}}' --tag {SIDE_BY_SIDE[1]}`): calibration "
                          f"{fixed['calib_seconds']:.0f} s fixed, {adaptive['calib_seconds']:.0f} s adaptive, "
                          f"{adaptive['calib_seconds'] / fixed['calib_seconds']:.2f} of it."]
    return lines + ["", about(f"{ACC} --groups budget --bits 3 --budget-iters 1000 --seeds 0 1 2 --changes "
                              "'{\"adaptive_iters\": true}' --tag adaptive", used, seed_counts(counts),
                              "Iterations used: of the fixed budget's (modules x 1,000), mean over seeds. These runs "
                              "shared the cores with others, so their times are not compared; the side-by-side pair "
                              "above is.")]
