"""Is a Top-1 gap between ADFQ without reconstruction and a baseline more than the luck of which validation images
flip? Seeds vary the calibration images, not the validation images, and both methods' weight grids are data-free, so
the seed spread leaves out the images' own sampling. This script keeps each run's per-image correctness and
resamples the 5,000 validation images and the seeds together (bootstrap): the interval it gives is the one a fresh
validation set drawn like this one would have.

    python bench/image_bootstrap.py --model deit_cifar --bits 6 --seeds 0 1 2 3 4 5 6 7 8 9

Resumable: a seed already in the results file is not run again (each seed is two calibrations without
reconstruction and two passes over the validation images, about a minute on one core).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from harness import REPO, load_results, logits_on, quantized_copy, reference_model_and_images, save_results
from report import BITS_PRESETS, LABELS

from adfq_lightning.io import atomic_write

METHOD = "adfq_init"


def pack(hits) -> str:
    """Per-image correctness (a bool tensor) as a string of 0s and 1s, image order kept."""
    return "".join("1" if h else "0" for h in hits.tolist())


def unpack(bits: str):
    import torch

    return torch.tensor([c == "1" for c in bits])


def run_seed(record: dict, seed: int) -> None:
    """Add to ``record`` the per-image correctness of ADFQ without reconstruction and the baseline, both calibrated
    on ``seed``'s images, and FP32's if it has none yet (one model, one validation set: the same for every seed)."""
    float_model, images, val, labels = reference_model_and_images(record["model"], 1024, record["num_val"], seed)
    if "fp" not in record:
        record["fp"] = pack(logits_on(float_model, val).argmax(1) == labels)
    run = {"seed": seed}
    for preset in (METHOD, record["baseline"]):
        model = quantized_copy(float_model, preset, record["bits"], seed, images)
        run[preset] = pack(logits_on(model, val).argmax(1) == labels)
    record["runs"].append(run)


def bootstrap(diff, resamples: int, generator) -> "torch.Tensor":
    """Mean of ``diff`` (seeds x images) over resampled seeds and resampled images, ``resamples`` times."""
    import torch

    seeds, images = diff.shape
    means = torch.empty(resamples, dtype=torch.float64)
    for b in range(resamples):
        by_image = diff[torch.randint(seeds, (seeds,), generator=generator)].mean(0)
        means[b] = by_image[torch.randint(images, (images,), generator=generator)].mean()
    return means


def report(record: dict, resamples: int) -> list[str]:
    import statistics

    import torch

    baseline, runs = record["baseline"], sorted(record["runs"], key=lambda r: r["seed"])
    ours = torch.stack([unpack(r[METHOD]) for r in runs]).double()
    theirs = torch.stack([unpack(r[baseline]) for r in runs]).double()
    fp = unpack(record["fp"]).double()
    diff = (ours - theirs) * 100
    per_seed = diff.mean(1).tolist()
    observed = statistics.mean(per_seed)
    seed_se = statistics.stdev(per_seed) / len(per_seed) ** 0.5 if len(per_seed) > 1 else float("nan")
    means = bootstrap(diff, resamples, torch.Generator().manual_seed(0))
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    image_only = bootstrap(diff.mean(0, keepdim=True), resamples, torch.Generator().manual_seed(1))
    discordant = (ours != theirs)
    ever, most = int(discordant.any(0).sum()), int((discordant.double().mean(0) > 0.5).sum())
    a, b = LABELS[METHOD], LABELS[baseline]
    lines = [f"# {a} against {b}, image by image: {record['model']} W{record['bits']}A{record['bits']}", "",
             "Produced by:", ""] + [f"- `{c}`" for c in record["commands"]] + [
             "", f"Top-1 % on the first {diff.shape[1]} validation images (FP32 {fp.mean() * 100:.2f}); each seed "
             "calibrates both methods on its own 1,024 images. *Right alone*: images exactly one of the two gets right.",
             "", f"| seed | {a} | {b} | difference | {a} right alone | {b} right alone |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r, o, t, d in zip(runs, ours, theirs, per_seed):
        lines.append(f"| {r['seed']} | {o.mean() * 100:.2f} | {t.mean() * 100:.2f} | {d:+.2f} | "
                     f"{int((o > t).sum())} | {int((t > o).sum())} |")
    lines += ["", f"- Mean difference over {len(runs)} seeds: **{observed:+.2f}** Top-1; seed by seed standard error "
              f"{seed_se:.2f} (the spread of calibration sets only).",
              f"- Resampling the validation images and the seeds together ({resamples} times): 95 % interval "
              f"**{low:+.2f} to {high:+.2f}**; {float((means >= 0).double().mean()) * 100:.0f} % of the resamples "
              f"have {a} at least as good. The images alone (seeds averaged) give a standard error of "
              f"{float(image_only.std()):.2f}.",
              f"- {ever} images are right for one method alone in at least one seed, {most} of them in more than half "
              "the seeds: a flip that repeats from seed to seed is the image's luck, which more seeds do not average.",
              "- " + ("The interval holds 0: on validation sets drawn like this one, the gap is not told apart from "
                      "which images happen to flip." if low <= 0 <= high else
                      "The interval leaves out 0: the gap is larger than which images happen to flip.")]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_cifar")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--baseline", default="percentile", choices=[preset for preset in BITS_PRESETS if preset != METHOD])
    p.add_argument("--num-val", type=int, default=5000)
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--report-only", action="store_true", help="render the results file's seeds, run nothing")
    args = p.parse_args(argv)
    out = REPO / "bench" / "results" / f"image_bootstrap_{args.model}_w{args.bits}_{args.baseline}"
    record = load_results(out.with_suffix(".json"))
    record.update(model=args.model, bits=args.bits, baseline=args.baseline)
    record.setdefault("commands", [])
    if record.setdefault("num_val", args.num_val) != args.num_val:
        raise SystemExit(f"{out.with_suffix('.json')} holds runs on {record['num_val']} validation images: pass "
                         f"--num-val {record['num_val']}, or move the file away to start over with {args.num_val}.")
    if not args.report_only:
        command = shlex.join(["python", "bench/image_bootstrap.py", *(argv if argv is not None else sys.argv[1:])])
        if command not in record["commands"]:
            record["commands"].append(command)
        done = {r["seed"] for r in record["runs"]}
        for seed in args.seeds:
            if seed not in done:
                run_seed(record, seed)
                save_results(out.with_suffix(".json"), record)
                print(f"seed {seed} done", flush=True)
    if not record["runs"]:
        raise SystemExit(f"{out.with_suffix('.json')} holds no seeds: run without --report-only first.")
    lines = report(record, args.resamples)
    atomic_write(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
