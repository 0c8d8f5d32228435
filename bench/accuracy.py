"""The accuracy benchmark: the three reference CIFAR-10 models and their outlier variants, over calibration seeds.

Groups of runs (``--groups``, run in the order given):

* ``bits``: FP32, and MinMax / Percentile / ADFQ without reconstruction at every width of ``--bits``;
* ``qkv_grid``: ADFQ without reconstruction with the q/k/v grids searched by the squared error instead of L2.4;
* ``adfq``: full ADFQ at ``--iters`` (200) at W3A3, W4A4, W6A6;
* ``stress``: the ``*_outliers`` variants at W4A4 and W3A3: the baselines, ADFQ with and without reconstruction;
* ``ablation``: full ADFQ at ``--iters`` with one component off (PPOQ, SLQ, log-√2 softmax, attention KL, QDrop)
  at W3A3 and W4A4, and PPOQ off on the outlier variants;
* ``budget``: full ADFQ at each of ``--budget-iters`` (100, 1000, 3000) iterations per module, W3A3 and W4A4;
* ``stress_budget``: the same budgets on the outlier variants;
* ``timing``: one run of each method at W4A4 per model, alone with ``--timing-threads`` threads: calibration
  wall time and peak memory on a quiet machine.

``--changes`` adds ADFQConfig settings to every ADFQ run (MinMax and Percentile stay as they are), and ``--tag``
names them, so a study is a sweep of the same benchmark:

    python -m bench accuracy --groups bits adfq stress --jobs 2
    python -m bench accuracy --groups budget --budget-iters 1000 --models deit_cifar swin_cifar \\
        --changes '{"scale_lr": 1.2e-4}' --tag scale_lr_x3
    python -m bench accuracy --groups bits budget --changes '{"bias_correction": false}' --tag no_bias_correction

Each seed draws other calibration images (1,024 of the 45,000 training images) and reseeds reconstruction; every
run is a fresh process with one thread. Top-1 is measured on the 5,000 validation images; ``--unseen`` adds the
35,746 training-part images no calibration seed 0-9 draws, for differences of tenths. Runs already in the results
file (``bench/results/accuracy.json``) are skipped, so a command resumes where it stopped. ``python -m bench
report`` renders the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness import REPO, load_results, make_spec, merge_results, pending, run_specs, save_results

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
#: the q/k/v grids searched with the squared error instead of the reference's L2.4
QKV_L2 = {"qkv_error_p": 2.0}
GROUPS = ("bits", "qkv_grid", "adfq", "stress", "ablation", "budget", "stress_budget", "timing")
#: budgets of the ``budget`` groups run at every seed; the others (3,000) at the first seed only
EVERY_SEED_BUDGETS = (100, 200, 1000)
RESULTS = REPO / "bench" / "results" / "accuracy.json"


def plan(args) -> list[dict]:
    """The accuracy runs of ``args.groups``, group after group in the order given."""
    seeds, models = args.seeds, args.models
    variants = [f"{m}_outliers" for m in models]
    low_bits = [b for b in args.bits if b in (3, 4)]  # the widths of the ablation and budget groups
    acc = dict(threads=1, device=args.device, unseen=args.unseen)

    def baseline(model, method, bits=None, seed=0, changes=None, tag=""):
        if method == "adfq_init":
            changes, tag = {**args.changes, **(changes or {})}, tag or args.tag
        return make_spec(model, method, bits, seed=seed, changes=changes, tag=tag, **acc)

    def adfq(model, bits, seed, iters=None, changes=None, tag=""):
        return make_spec(model, "adfq", bits, seed=seed, iters=iters or args.iters,
                         changes={**args.changes, **(changes or {})}, tag=tag or args.tag, **acc)

    def budgets(names):
        return [adfq(m, b, s, iters=it) for it in args.budget_iters for m in names for b in low_bits
                for s in (seeds if it in EVERY_SEED_BUDGETS else seeds[:1])]

    groups = {
        "bits": lambda: [make_spec(m, "fp", **acc) for m in models]
        + [baseline(m, method, b, s) for m in models for b in args.bits for method in BASELINES for s in seeds],
        "qkv_grid": lambda: [baseline(m, "adfq_init", b, s, changes=QKV_L2, tag="qkv_l2")
                             for s in seeds for m in models for b in args.bits],
        "adfq": lambda: [adfq(m, b, s) for m in models for b in (3, 4, 6) for s in seeds],
        "stress": lambda: [make_spec(v, "fp", **acc) for v in variants]
        + [baseline(v, method, b, s) for v in variants for b in (4, 3) for s in seeds for method in BASELINES]
        + [adfq(v, b, s) for v in variants for b in (4, 3) for s in seeds],
        "ablation": lambda: [adfq(m, b, s, changes=changes, tag=tag) for m in models for b in low_bits
                             for s in seeds for tag, changes in ABLATIONS.items()]
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
    p = argparse.ArgumentParser(prog="python -m bench accuracy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--groups", nargs="+", default=["bits", "adfq", "stress"], choices=GROUPS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 6, 7, 8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=200,
                   help="iterations per module of the adfq, stress, ablation and timing groups (default 200)")
    p.add_argument("--budget-iters", nargs="+", type=int, default=[100, 1000, 3000],
                   help="budgets of the budget groups (100, 200 and 1000 run every seed, others the first)")
    p.add_argument("--changes", type=json.loads, default={},
                   help="ADFQConfig settings added to every ADFQ run, as JSON, e.g. '{\"scale_lr\": 1.2e-4}'")
    p.add_argument("--tag", default="", help="a name for --changes, kept with the runs")
    p.add_argument("--unseen", action="store_true",
                   help="also score every run on the 35,746 training-part images no calibration seed 0-9 draws "
                        "(about 3 min more a run on one core); a run recorded without that score runs again")
    p.add_argument("--jobs", type=int, default=2, help="accuracy runs at a time (1 thread each)")
    p.add_argument("--device", default="cpu", help="where the runs calibrate and evaluate (cpu, cuda)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: no run starts later, and a run still going then is stopped and not recorded")
    p.add_argument("--timing-threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file (default %(default)s)")
    p.add_argument("--merge", nargs="+", type=Path, default=[],
                   help="results files of runs made elsewhere (another machine, a GPU): add their new runs")
    p.add_argument("--dry-run", action="store_true", help="print how many runs the command plans, run none")
    args = p.parse_args(argv)
    if args.changes and not args.tag:
        p.error("--changes needs --tag, a name for the setting")
    if args.merge:
        data = load_results(args.results)
        added = merge_results(data, [load_results(other) for other in args.merge])
        save_results(args.results, data)
        print(f"{added} runs added to {args.results}", flush=True)
        return 0
    specs = plan(args)
    timing = timing_plan(args) if "timing" in args.groups else []
    if args.dry_run:
        todo = pending(specs + timing, load_results(args.results))
        print(f"{len(specs) + len(timing)} runs planned, {len(todo)} not yet in {args.results}", flush=True)
        return 0
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    left = lambda: None if deadline is None else deadline - time.monotonic()  # noqa: E731
    run_specs(specs, args.results, jobs=args.jobs, time_budget=left())
    if timing:  # alone, one at a time: wall times and memory of a quiet machine
        run_specs(timing, args.results, jobs=1, time_budget=left())
    print("python -m bench report renders the tables", flush=True)
    return 0
