#!/usr/bin/env python
"""The accuracy benchmark behind docs/benchmark.md: the reference models and their outlier variants, over seeds.

Groups of runs (``--groups``, in this order of priority):

* ``bits``: FP, and MinMax / Percentile / ADFQ without reconstruction at every bit width of ``--bits``;
* ``qkv_grid``: ADFQ without reconstruction with the q/k/v grids searched by the squared error instead of
  L2.4 (tag ``qkv_l2``), seed by seed, to pair with ``bits``;
* ``adfq``: full ADFQ at the short budget (``--iters``; the default run's at W6A6) at W3A3, W4A4, W6A6;
* ``stress``: the ``*_outliers`` variants at W4A4 and W3A3: the baselines, ADFQ with and without
  reconstruction;
* ``ablation``: full ADFQ with one component off (PPOQ, SLQ, log-sqrt(2) softmax, attention KL, QDrop) at
  W3A3 and W4A4 (those of ``--bits``, in its order), and on the ``*_outliers`` variants ADFQ with and without
  reconstruction, each without PPOQ;
* ``budget``: full ADFQ at 100 and 1,000 iterations per module (W3A3, W4A4, every seed; 1,000 is the default
  run's budget there, ``--default-iters``) and 3,000 (first seed); ``--budget-iters`` picks among them and
  their order, ``--bits`` the widths as for ``ablation``;
* ``stress_budget``: the same budgets on the ``*_outliers`` variants;
* ``timing``: one run of each method at W4A4 per model, alone and with ``--timing-threads`` threads, for
  the calibration wall time and peak memory (the accuracy runs share the cores and are not timed).

Groups run in the order given. Each seed draws other calibration images (1,024 of the 45,000 training images)
and reseeds reconstruction.

    python bench/run_benchmark.py --groups bits adfq --jobs 2
    python bench/run_benchmark.py --groups budget --budget-iters 1000 --device cuda --jobs 3 --time-budget 300
    python bench/run_benchmark.py --merge other/benchmark.json   # runs made elsewhere, then the report
    python bench/run_benchmark.py --report-only

Writes ``bench/results/benchmark.json`` (resumable), ``benchmark.md`` and ``top1_vs_bits.png``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from harness import REPO, load_results, make_spec, merge_results, run_specs, save_results
from report import write_reports

MODELS = ("vit_cifar", "deit_cifar", "swin_cifar")
BASELINES = ("minmax", "percentile", "adfq_init")
#: ablation tag -> ADFQConfig changes on full ADFQ
ABLATIONS = {
    "no_ppoq": {"ppoq": False},
    "no_slq": {"slq": False},
    "no_log_softmax": {"log_softmax": False},
    "no_attn_kl": {"attn_kl": False},
    "no_qdrop": {"qdrop_prob": 1.0},
}
#: the q/k/v grids searched with the squared error instead of the reference's L2.4 (no reconstruction, every width)
QKV_L2 = {"qkv_error_p": 2.0}
GROUPS = ("bits", "qkv_grid", "adfq", "stress", "ablation", "budget", "stress_budget", "timing")
#: budgets of the ``budget`` group run at every seed; the others (3,000) at the first seed only
EVERY_SEED_BUDGETS = (100, 1000)


def plan(args) -> list[dict]:
    """The accuracy runs of ``args.groups``, group after group in the order given."""
    seeds, models = args.seeds, args.models
    variants = [f"{m}_outliers" for m in models]
    low_bits = [b for b in args.bits if b in (3, 4)]  # the widths of the ablation and budget groups
    acc = dict(threads=1, device=args.device)
    baseline = lambda model, method, bits=None, seed=0, **kw: make_spec(model, method, bits, seed=seed, **acc, **kw)  # noqa: E731
    adfq = lambda model, bits, seed, **kw: make_spec(model, "adfq", bits, seed=seed, **{"iters": args.iters, **acc, **kw})  # noqa: E731
    budgets = lambda names: [adfq(m, b, s, iters=it) for it in args.budget_iters for m in names for b in low_bits  # noqa: E731
                             for s in (seeds if it in EVERY_SEED_BUDGETS else seeds[:1])]
    groups = {
        "bits": lambda: [baseline(m, "fp") for m in models]
        + [baseline(m, method, b, s) for m in models for b in args.bits for method in BASELINES for s in seeds],
        "qkv_grid": lambda: [baseline(m, "adfq_init", b, s, changes=QKV_L2, tag="qkv_l2")
                             for s in seeds for m in models for b in args.bits],  # seed by seed: each one whole
        "adfq": lambda: [adfq(m, b, s) for m in models for b in (3, 4, 6) for s in seeds],
        # the quick runs (no reconstruction) first
        "stress": lambda: [baseline(v, "fp") for v in variants]
        + [baseline(v, method, b, s) for v in variants for b in (4, 3) for s in seeds for method in BASELINES]
        + [adfq(v, b, s) for v in variants for b in (4, 3) for s in seeds],
        "ablation": lambda: [adfq(m, b, s, changes=changes, tag=tag) for m in models for b in low_bits
                             for s in seeds for tag, changes in ABLATIONS.items()]
        # on the stress variants, PPOQ alone: the one component they exist for
        + [run for v in variants for b in low_bits for s in seeds
           for run in (baseline(v, "adfq_init", b, s, changes=ABLATIONS["no_ppoq"], tag="no_ppoq"),
                       adfq(v, b, s, changes=ABLATIONS["no_ppoq"], tag="no_ppoq"))],
        "budget": lambda: budgets(models),
        "stress_budget": lambda: budgets(variants),
    }
    return [spec for group in args.groups if group in groups for spec in groups[group]()]


def timing_plan(args) -> list[dict]:
    threads = dict(threads=args.timing_threads, device=args.device)
    specs = []
    for m in args.models:
        specs += [make_spec(m, method, 4, **threads) for method in BASELINES]
        specs.append(make_spec(m, "adfq", 4, iters=args.iters, **threads))
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 6, 7, 8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=200,
                   help="the short budget (iterations per module) of the adfq, stress and ablation groups; the "
                        "default run's at W6A6")
    p.add_argument("--default-iters", type=int, default=1000,
                   help="the default run's budget at W3A3 and W4A4 (the shipped W4A4 configs'): the report's "
                        "targets are checked at it")
    p.add_argument("--jobs", type=int, default=2, help="accuracy runs at a time (1 thread each)")
    p.add_argument("--budget-iters", nargs="+", type=int, default=[100, 1000, 3000], choices=[100, 1000, 3000])
    p.add_argument("--device", default="cpu", help="where the accuracy runs calibrate and evaluate (cpu, cuda)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: no run starts later, and a run still going then is stopped and not recorded")
    p.add_argument("--timing-threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--merge", nargs="+", type=Path, default=[],
                   help="results files of runs made elsewhere (another machine, a GPU): add their new runs, report")
    args = p.parse_args(argv)
    path = args.out / "benchmark.json"
    if args.report_only or args.merge:
        data = load_results(path)
        if args.merge:
            added = merge_results(data, [load_results(other) for other in args.merge])
            save_results(path, data)
            print(f"{added} runs added to {path}", flush=True)
        write_reports(data, args.out, args.iters, args.default_iters)
        return 0
    command = shlex.join(["python", "bench/run_benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    on_result = lambda data: write_reports(data, args.out, args.iters, args.default_iters)  # noqa: E731
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    left = lambda: None if deadline is None else deadline - time.monotonic()  # noqa: E731
    run_specs(plan(args), path, command, jobs=args.jobs, on_result=on_result, time_budget=left())
    if "timing" in args.groups:  # alone, one at a time: wall times and memory of a quiet machine
        run_specs(timing_plan(args), path, command, jobs=1, on_result=on_result, time_budget=left())
    write_reports(load_results(path), args.out, args.iters, args.default_iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
