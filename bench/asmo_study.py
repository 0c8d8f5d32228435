#!/usr/bin/env python
"""Why does ASMO reconstruction help or hurt? Each hypothesis of issue 10 as a switch, measured over seeds.

Every variant is full ADFQ (``adfq`` preset) with one set of ``ADFQConfig`` changes, at a few
reconstruction budgets, beside ADFQ without reconstruction (``adfq_init``) on the same calibration seeds.
The safeguard is off in every variant but ``safeguard``, so that each switch is seen on its own.

    python bench/asmo_study.py --model vit_cifar --bits 3 --iters 100 200 --seeds 0 1 2 --jobs 2
    python bench/asmo_study.py --report-only

Writes ``bench/results/asmo_study.json`` (every run, resumable) and ``asmo_study.md`` (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

from harness import REPO, heldout_error_ratio, load_results, make_spec, reconstructed_modules, run_specs, select

from adfq_lightning.io import atomic_write

#: The v0.1 engine, at the reference's AdaRound learning rate (3e-3 at every budget).
BASE = {"rounding_lr": 3e-3, "act_grad": "ste", "learn_steps": "all", "weight_grid": "search", "attn_kl_form": "keys", "safeguard": False}
#: variant -> (what it tests, ADFQConfig changes on top of BASE)
VARIANTS = {
    "base": ("v0.1 engine: rounding lr 3e-3, STE everywhere, every step size learns, L2.4 weight grid, KL over keys", {}),
    "in_range": ("straight-through only inside each quantizer's range", {"act_grad": "in_range"}),
    "no_act_grad": ("no gradient through activation quantizers (reference rounding)", {"act_grad": "none"}),
    "linear_steps": ("only the step sizes of Linear inputs learn (reference)", {"learn_steps": "linear_inputs"}),
    "reference_routing": ("both of the above: the reference code's gradient routing",
                          {"act_grad": "none", "learn_steps": "linear_inputs"}),
    "reference_weight_grid": ("weight grid: three percentiles, L2 error (reference)", {"weight_grid": "reference"}),
    "kl_heads": ("attention term in the reference's form (softmax over heads, KL(P_q||P_fp))",
                 {"attn_kl_form": "heads"}),
    "rounding_lr_x3": ("AdaRound learning rate 1e-2 instead of 3e-3", {"rounding_lr": 1e-2}),
    "rounding_lr_x10": ("AdaRound learning rate 3e-2 instead of 3e-3", {"rounding_lr": 3e-2}),
    "safeguard": ("base + per-module safeguard on held-out images", {"safeguard": True}),
    "rounding_lr_x30": ("AdaRound learning rate 1e-1 instead of 3e-3", {"rounding_lr": 1e-1}),
    "lr_x10_harden_0.8": ("learning rate 3e-2, rounding hardened after 80 % of the iterations, steps tuned after",
                          {"rounding_lr": 3e-2, "harden_at": 0.8}),
    "lr_x10_in_range": ("learning rate 3e-2 and straight-through inside the range only",
                        {"rounding_lr": 3e-2, "act_grad": "in_range"}),
    "budget_lr": ("learning rate scaled with the budget (3e-3 x 3000 / iters, the v0.2 default)", {"rounding_lr": None}),
}


def plan(args) -> list[dict]:
    specs = []
    for bits in args.bits:
        for seed in args.seeds:
            common = dict(seed=seed, threads=args.threads)
            specs.append(make_spec(args.model, "adfq_init", bits, **common))
            for name in args.variants:
                for iters in args.iters:
                    specs.append(make_spec(args.model, "adfq", bits, iters=iters, tag=name,
                                           changes={**BASE, **VARIANTS[name][1]}, **common))
    return specs


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(data: dict) -> str:
    runs = data["runs"]
    lines = ["# ASMO study: reconstruction hypotheses (issue 10)", "", "Produced by:", ""]
    lines += [f"- `{c}`" for c in data["meta"].get("commands", [])] + [""]
    machine = data["meta"].get("machine", {})
    lines += [f"Machine: {machine.get('cpu_count')} CPUs ({machine.get('cpu_model')}), torch {machine.get('torch')}; "
              "each run in a fresh process with 1 thread. Top-1 % on the 5,000 validation images, mean ± std over "
              "calibration seeds (each seed draws other 1,024 calibration images and reseeds reconstruction). "
              "`undecided`: share of AdaRound variables still strictly between 0 and 1 when the budget ends (mean "
              "over modules); `err ratio`: held-out output error after / before reconstruction (geometric mean over "
              "modules, before any safeguard); `reverted`: modules the safeguard put back (summed over seeds).", ""]
    for model in dict.fromkeys(r["model"] for r in runs):
        for bits in sorted({r["w_bits"] for r in runs if r["model"] == model}):
            mr = select(runs, model=model, w_bits=bits)
            init = [r["top1"] for r in select(mr, preset="adfq_init")]
            iters = sorted({r["iters"] for r in mr if r["preset"] == "adfq"})
            lines += [f"## {model} W{bits}A{bits}", "",
                      f"ADFQ without reconstruction: **{mean_std(init)}** ({len(init)} seeds)", ""]
            lines += ["| variant | what it tests | " + " | ".join(f"{i} it: Top-1" for i in iters)
                      + " | " + " | ".join(f"{i} it: undecided / err ratio / reverted" for i in iters) + " |",
                      "|---|---|" + "---:|" * (2 * len(iters))]
            for name, (what, _) in VARIANTS.items():
                cells, conv = [], []
                for i in iters:
                    rs = select(mr, preset="adfq", tag=name, iters=i)
                    cells.append(mean_std([r["top1"] for r in rs]))
                    mods = reconstructed_modules(rs)
                    if mods:
                        und = statistics.mean(m["undecided"] for m in mods)
                        conv.append(f"{und:.2f} / {heldout_error_ratio(mods):.2f} / "
                                    f"{sum(bool(m['reverted']) for m in mods)}")
                    else:
                        conv.append("–")
                if any(c != "–" for c in cells):
                    lines.append(f"| {name} | {what} | " + " | ".join(cells) + " | " + " | ".join(conv) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_cifar")
    p.add_argument("--bits", nargs="+", type=int, default=[3])
    p.add_argument("--iters", nargs="+", type=int, default=[100, 200])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--name", default="asmo_study", help="stem of the .json/.md results (one per code version)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    path = args.out / f"{args.name}.json"
    write = lambda data: atomic_write(args.out / f"{args.name}.md", render(data).encode())  # noqa: E731
    if args.report_only:
        write(load_results(path))
        return 0
    command = shlex.join(["python", "bench/asmo_study.py", *(argv if argv is not None else sys.argv[1:])])
    write(run_specs(plan(args), path, command, jobs=args.jobs, on_result=write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
