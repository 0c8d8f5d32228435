"""Issue 10 §3 on more images: the share of the 3,000-it Top-1 gain that 200 it (then the default) reach, measured on
the 5,000 validation images and on the ~35,000 training-part images no calibration seed 0-9 draws
(``image_bootstrap.py`` explains that set), each run's per-image correctness kept so that images and seeds can be
resampled together.

    python bench/budget_images.py --model deit_cifar --bits 4 --seeds 0 1 2 --iters 0 200 3000

One file per run in ``bench/results/<name>/`` (``--name``, default ``budget_images``; resumable, and two commands
with disjoint runs can go side by side); ``--report-only`` renders ``<name>_<model>_w<bits>.md`` from the runs there.
A new ``--name`` keeps runs made under a new library default apart from the stored ones, which would otherwise be
resumed as done. ``--short-changes`` gives the short budget's runs the default run's own recipe (its step-size rate).
A 3,000-it DeiT run takes about 25 min on one core, the others a few.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Optional

from harness import REPO, logits_on, quantized_copy, reference_model_and_images
from image_bootstrap import CALIBRATION_SEEDS, NUM_CALIB, pack, unpack, unseen_training_images

from adfq_lightning.io import atomic_write

RESULTS = REPO / "bench" / "results"
IMAGE_SETS = ("val", "train")


def run_path(runs: Path, model: str, bits: int, iters: int, seed: int):
    return runs / f"{model}_w{bits}_it{iters}_s{seed}.json"


def run(runs: Path, model: str, bits: int, iters: int, seed: int, changes: dict, scored: dict, command: str) -> None:
    """Quantize ``model`` (no reconstruction for ``iters`` 0, else with the config ``changes``) on ``seed``'s images
    into the folder ``runs``; save its per-image correctness on both image sets, and FP32's once. ``scored`` caches
    the images across runs of one command."""
    float_model, images, val, val_labels = reference_model_and_images(model, NUM_CALIB, 5000, seed)
    if not scored:
        scored.update(val=(val, val_labels), train=unseen_training_images(float_model))
    fp_path = runs / f"{model}_fp.json"
    if not fp_path.is_file():
        hits = {name: pack(logits_on(float_model, x).argmax(1) == y) for name, (x, y) in scored.items()}
        atomic_write(fp_path, json.dumps(hits).encode())
    preset, settings = ("adfq_init", {}) if iters == 0 else ("adfq", {"iters": iters, **changes})
    quantized = quantized_copy(float_model, preset, bits, seed, images, **settings)
    record = {"command": command, "model": model, "bits": bits, "iters": iters, "seed": seed, "changes": settings}
    record.update({name: pack(logits_on(quantized, x).argmax(1) == y) for name, (x, y) in scored.items()})
    atomic_write(run_path(runs, model, bits, iters, seed), json.dumps(record).encode())


def share_interval(init, short, long, resamples: int):
    """Share of the long budget's gain that the short one reaches: the point value (gains over every image and seed)
    and a 95 % bootstrap interval, resampling seeds and images together. Each argument is seeds x images (0/1)."""
    import torch

    gain_short, gain_long = short - init, long - init
    generator = torch.Generator().manual_seed(0)
    seeds, images = init.shape
    shares = []
    for _ in range(resamples):
        s = torch.randint(seeds, (seeds,), generator=generator)
        i = torch.randint(images, (images,), generator=generator)
        shares.append(float(gain_short[s][:, i].mean() / gain_long[s][:, i].mean()))
    low, high = torch.quantile(torch.tensor(shares, dtype=torch.float64), torch.tensor([0.025, 0.975],
                                                                                         dtype=torch.float64)).tolist()
    return float(gain_short.mean() / gain_long.mean()), low, high


def report(folder: Path, model: str, bits: int, short: int, long: int, resamples: int) -> Optional[list[str]]:
    """The report's lines for the runs in ``folder``, or None while no seed has runs at all three budgets."""
    import torch

    budgets = (0, short, long)
    runs = {}
    for path in sorted(folder.glob(f"{model}_w{bits}_it*_s*.json")):
        record = json.loads(path.read_text())
        runs[(record["iters"], record["seed"])] = record
    seeds = sorted(seed for seed in {s for _, s in runs} if all((it, seed) in runs for it in budgets))
    if not seeds:
        return None
    fp = json.loads((folder / f"{model}_fp.json").read_text())
    commands = sorted({runs[(it, s)]["command"] for it in budgets for s in seeds})
    lines = [f"# §3 on more images: {model} W{bits}A{bits}, {short} against {long} it/module", "", "Produced by:", ""]
    lines += [f"- `{c}`" for c in commands]
    short_changes = {json.dumps({k: v for k, v in runs[(short, s)].get("changes", {}).items() if k != "iters"},
                                sort_keys=True) for s in seeds}
    if short_changes != {"{}"}:
        lines += ["", f"The {short}-it runs change the config by {', '.join(sorted(short_changes))}."]
    lines += ["", "Top-1 % per seed on the 5,000 validation images and on the training-part images no calibration "
              "seed 0-9 draws (the float model was trained on them, the quantizers never saw them). Gains are over "
              "the same seed's run without reconstruction.", ""]
    for name in IMAGE_SETS:
        hits = {it: torch.stack([unpack(runs[(it, s)][name]) for s in seeds]).double() * 100 for it in budgets}
        count = hits[0].shape[1]
        lines += [f"## {'validation' if name == 'val' else 'training part'}: {count} images, FP32 "
                  f"{unpack(fp[name]).double().mean() * 100:.2f}", "",
                  f"| seed | no reconstruction | {short} it | {long} it | gain at {short} | gain at {long} |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for k, seed in enumerate(seeds):
            top1 = [float(hits[it][k].mean()) for it in budgets]
            lines.append(f"| {seed} | {top1[0]:.2f} | {top1[1]:.2f} | {top1[2]:.2f} | {top1[1] - top1[0]:+.2f} | "
                         f"{top1[2] - top1[0]:+.2f} |")
        share, low, high = share_interval(hits[0], hits[short], hits[long], resamples)
        mean_gain = [statistics.mean(float((hits[it][k] - hits[0][k]).mean()) for k in range(len(seeds)))
                     for it in (short, long)]
        lines += ["", f"Mean gain {mean_gain[0]:+.2f} at {short} it and {mean_gain[1]:+.2f} at {long}: {short} it "
                  f"reach **{share * 100:.0f} %** of the {long}-it gain; 95 % interval over seeds and images resampled "
                  f"together ({resamples} times) {low * 100:.0f} to {high * 100:.0f} %.", ""]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_cifar")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, nargs="+", default=[0, 200, 3000], help="budgets to run (0: no reconstruction)")
    p.add_argument("--short", type=int, default=200, help="the report's default budget")
    p.add_argument("--long", type=int, default=3000, help="the report's long budget")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--short-changes", type=json.loads, default={}, metavar="JSON",
                   help='ADFQConfig changes for the short budget\'s runs, e.g. \'{"scale_lr": 1.2e-4}\'')
    p.add_argument("--name", default="budget_images", help="the runs' folder under bench/results and the report's stem")
    p.add_argument("--report-only", action="store_true", help="render the runs already made, run nothing")
    args = p.parse_args(argv)
    runs = RESULTS / args.name
    if not args.report_only:
        if not set(args.seeds) <= set(CALIBRATION_SEEDS):
            p.error("the training-part images left out are those seeds 0-9 calibrate on: pass seeds from 0-9.")
        runs.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "bench/budget_images.py", *(argv if argv is not None else sys.argv[1:])])
        scored: dict = {}
        for seed in args.seeds:
            for iters in args.iters:
                if not run_path(runs, args.model, args.bits, iters, seed).is_file():
                    changes = args.short_changes if iters == args.short else {}
                    run(runs, args.model, args.bits, iters, seed, changes, scored, command)
                    print(f"seed {seed}, {iters} it done", flush=True)
    lines = report(runs, args.model, args.bits, args.short, args.long, args.resamples)
    if lines is None:
        print(f"no seed has all of 0, {args.short} and {args.long} it/module yet: nothing to report.")
        return 0 if not args.report_only else 1
    atomic_write(RESULTS / f"{args.name}_{args.model}_w{args.bits}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
