#!/usr/bin/env python
"""The accuracy benchmark behind the README: the reference models and their outlier variants, over seeds.

Groups of runs (``--groups``, in this order of priority):

* ``bits``: FP, and MinMax / Percentile / ADFQ without reconstruction at every bit width of ``--bits``;
* ``adfq``: full ADFQ at the default budget (``--iters``, the default run's) at W3A3, W4A4, W6A6;
* ``stress``: the ``*_outliers`` variants at W4A4 and W3A3: the baselines, ADFQ with and without
  reconstruction, each also without PPOQ;
* ``ablation``: full ADFQ with one component off (PPOQ, SLQ, log-sqrt(2) softmax, attention KL, QDrop) at
  W4A4 and W3A3;
* ``budget``: full ADFQ at 1,000 iterations per module (W3A3, W4A4, every seed) and 3,000 (first seed);
* ``timing``: one run of each method at W4A4 per model, alone and with ``--timing-threads`` threads, for
  the calibration wall time and peak memory (the accuracy runs share the cores and are not timed).

Each seed draws other calibration images (1,024 of the 45,000 training images) and reseeds reconstruction.

    python bench/run_benchmark.py --groups bits adfq --jobs 2
    python bench/run_benchmark.py --report-only

Writes ``bench/results/benchmark.json`` (resumable), ``benchmark.md`` and ``top1_vs_bits.png``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from harness import REPO, load_results, make_spec, run_specs
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
GROUPS = ("bits", "adfq", "stress", "ablation", "budget", "timing")


def plan(args) -> list[dict]:
    specs = []
    seeds, models = args.seeds, args.models
    variants = [f"{m}_outliers" for m in models]
    acc = dict(threads=1)
    adfq = lambda model, bits, seed, **kw: make_spec(model, "adfq", bits, seed=seed, **{"iters": args.iters, **acc, **kw})  # noqa: E731
    if "bits" in args.groups:
        specs += [make_spec(m, "fp", **acc) for m in models]
        specs += [make_spec(m, method, b, seed=s, **acc)
                  for m in models for b in args.bits for method in BASELINES for s in seeds]
    if "adfq" in args.groups:
        specs += [adfq(m, b, s) for m in models for b in (3, 4, 6) for s in seeds]
    if "stress" in args.groups:  # the quick runs (no reconstruction) first
        specs += [make_spec(v, "fp", **acc) for v in variants]
        specs += [make_spec(v, method, b, seed=s, **acc) for v in variants for b in (4, 3) for s in seeds
                  for method in BASELINES]
        specs += [make_spec(v, "adfq_init", b, seed=s, changes=ABLATIONS["no_ppoq"], tag="no_ppoq", **acc)
                  for v in variants for b in (4, 3) for s in seeds]
        specs += [run for v in variants for b in (4, 3) for s in seeds
                  for run in (adfq(v, b, s), adfq(v, b, s, changes=ABLATIONS["no_ppoq"], tag="no_ppoq"))]
    if "ablation" in args.groups:
        specs += [adfq(m, b, s, changes=changes, tag=tag)
                  for m in models for b in (4, 3) for s in seeds for tag, changes in ABLATIONS.items()]
    if "budget" in args.groups:
        specs += [adfq(m, b, s, iters=1000) for m in models for b in (3, 4) for s in seeds]
        specs += [adfq(m, b, seeds[0], iters=3000) for m in models for b in (4, 3)]
    return specs


def timing_plan(args) -> list[dict]:
    threads = dict(threads=args.timing_threads)
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
    p.add_argument("--iters", type=int, default=200, help="the default budget (iterations per module)")
    p.add_argument("--jobs", type=int, default=2, help="accuracy runs at a time (1 thread each)")
    p.add_argument("--timing-threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    path = args.out / "benchmark.json"
    if args.report_only:
        write_reports(load_results(path), args.out, args.iters)
        return 0
    command = shlex.join(["python", "bench/run_benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    on_result = lambda data: write_reports(data, args.out, args.iters)  # noqa: E731
    run_specs(plan(args), path, command, jobs=args.jobs, on_result=on_result)
    if "timing" in args.groups:  # alone, one at a time: wall times and memory of a quiet machine
        run_specs(timing_plan(args), path, command, jobs=1, on_result=on_result)
    write_reports(load_results(path), args.out, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
