"""Is a Top-1 gap between ADFQ without reconstruction and a baseline more than the luck of which validation images
flip? Seeds vary the calibration images, not the validation images, and both methods' weight grids are data-free, so
the seed spread leaves out the images' own sampling. This script keeps each run's per-image correctness and
resamples the 5,000 validation images and the seeds together (bootstrap): the interval it gives is the one a fresh
validation set drawn like this one would have.

    python bench/image_bootstrap.py --model deit_cifar --bits 6 --seeds 0 1 2 3 4 5 6 7 8 9

CIFAR-10 has no further held-out images, so ``--images train`` scores the same runs on the ~35,000 images of the
training part that no calibration seed 0-9 draws: images the float model was trained on (its Top-1 there is higher),
but seven times as many, none of them seen by the quantizers. A second, larger sample of the same paired gap, not
the validation Top-1 that the target is set on.

Resumable: a seed already in the results file is not run again (each seed is two calibrations without
reconstruction and two passes over the scored images: about a minute on one core for the validation images, six
for the training part).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import NamedTuple

from harness import REPO, load_results, logits_on, quantized_copy, reference_model_and_images, save_results
from report import BITS_PRESETS, LABELS

from adfq_lightning.io import atomic_write

METHOD = "adfq_init"
NUM_CALIB = 1024
CALIBRATION_SEEDS = range(10)  # --images train leaves out every image these seeds calibrate on


def pack(hits) -> str:
    """Per-image correctness (a bool tensor) as a string of 0s and 1s, image order kept."""
    return "".join("1" if h else "0" for h in hits.tolist())


def unpack(bits: str):
    import torch

    return torch.tensor([c == "1" for c in bits])


class ScoringSplit(NamedTuple):
    """The decoded archive and, as index tensors into it: the training part, the validation images, the images
    seeds in ``CALIBRATION_SEEDS`` calibrate on (``drawn``, with repeats) and the training part's others
    (``unseen``)."""

    data: object
    train: object
    val: object
    drawn: object
    unseen: object


def scoring_split() -> ScoringSplit:
    """Decode the archive (cached) and split it as every scoring script here does."""
    import torch

    from adfq_lightning.data import DEFAULT_ARCHIVE, calibration_indices, decode_image_folder, split_indices

    data = decode_image_folder(DEFAULT_ARCHIVE)
    train_idx, val_idx = split_indices(data.labels)
    drawn = torch.cat([calibration_indices(data.labels, NUM_CALIB, seed, candidates=train_idx)
                       for seed in CALIBRATION_SEEDS])
    return ScoringSplit(data, train_idx, val_idx, drawn, train_idx[~torch.isin(train_idx, drawn)])


def unseen_training_images(float_model):
    """The training part's images that no seed in ``CALIBRATION_SEEDS`` calibrates on, transformed for
    ``float_model``, and their labels."""
    import timm.data

    from adfq_lightning.data import cifar10_eval_transform

    transform = cifar10_eval_transform(timm.data.resolve_data_config(model=float_model))
    split = scoring_split()
    return transform(split.data.images[split.unseen]), split.data.labels[split.unseen]


def run_seed(record: dict, seed: int, scored: dict) -> None:
    """Add to ``record`` the per-image correctness of ADFQ without reconstruction and the baseline, both calibrated
    on ``seed``'s images, and FP32's if it has none yet (one model, one image set: the same for every seed).
    ``scored`` caches the scored images and labels across seeds."""
    float_model, images, eval_images, eval_labels = reference_model_and_images(record["model"], NUM_CALIB,
                                                                               record["num_val"], seed)
    if record["images"] == "train":
        if not scored:
            scored["images"], scored["labels"] = unseen_training_images(float_model)
        eval_images, eval_labels = scored["images"], scored["labels"]
    if "fp" not in record:
        record["fp"] = pack(logits_on(float_model, eval_images).argmax(1) == eval_labels)
    run = {"seed": seed}
    for preset in (METHOD, record["baseline"]):
        model = quantized_copy(float_model, preset, record["bits"], seed, images)
        run[preset] = pack(logits_on(model, eval_images).argmax(1) == eval_labels)
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


def seed_standard_error(per_seed: list) -> float:
    """Standard error of the mean of one value per seed (nan for a single seed)."""
    import statistics

    return statistics.stdev(per_seed) / len(per_seed) ** 0.5 if len(per_seed) > 1 else float("nan")


def bootstrap_interval(diff, resamples: int):
    """95 % interval of ``diff``'s mean (seeds x images) over seeds and images resampled together, and the means."""
    import torch

    means = bootstrap(diff, resamples, torch.Generator().manual_seed(0))
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high, means


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
    seed_se = seed_standard_error(per_seed)
    low, high, means = bootstrap_interval(diff, resamples)
    image_only = bootstrap(diff.mean(0, keepdim=True), resamples, torch.Generator().manual_seed(1))
    discordant = (ours != theirs)
    ever, most = int(discordant.any(0).sum()), int((discordant.double().mean(0) > 0.5).sum())
    a, b = LABELS[METHOD], LABELS[baseline]
    lines = [f"# {a} against {b}, image by image: {record['model']} W{record['bits']}A{record['bits']}", "",
             "Produced by:", ""] + [f"- `{c}`" for c in record["commands"]] + [
             "", f"Top-1 % on {scored_images(record, diff.shape[1])} (FP32 {fp.mean() * 100:.2f}); each seed "
             "calibrates both methods on its own 1,024 images. *Right alone*: images exactly one of the two gets "
             "right.",
             "", f"| seed | {a} | {b} | difference | {a} right alone | {b} right alone |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r, o, t, d in zip(runs, ours, theirs, per_seed):
        lines.append(f"| {r['seed']} | {o.mean() * 100:.2f} | {t.mean() * 100:.2f} | {d:+.2f} | "
                     f"{int((o > t).sum())} | {int((t > o).sum())} |")
    lines += ["", f"- Mean difference over {len(runs)} seeds: **{observed:+.2f}** Top-1; seed by seed standard error "
              f"{seed_se:.2f} (the spread of calibration sets only).",
              f"- Resampling the scored images and the seeds together ({resamples} times): 95 % interval "
              f"**{low:+.2f} to {high:+.2f}**; {float((means >= 0).double().mean()) * 100:.0f} % of the resamples "
              f"have {a} at least as good. The images alone (seeds averaged) give a standard error of "
              f"{float(image_only.std()):.2f}.",
              f"- {ever} images are right for one method alone in at least one seed, {most} of them in more than half "
              "the seeds: a flip that repeats from seed to seed is the image's luck, which more seeds do not average.",
              "- " + ("The interval holds 0: on image sets drawn like this one, the gap is not told apart from "
                      "which images happen to flip." if low <= 0 <= high else
                      "The interval leaves out 0: the gap is larger than which images happen to flip.")]
    return lines


def scored_images(record: dict, count: int) -> str:
    """What the Top-1 columns were measured on, for the report."""
    if record["images"] == "train":
        return (f"the {count} training-part images that no calibration seed 0-9 draws (the float model was trained "
                "on them, the quantizers never saw them)")
    return f"the first {count} validation images"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_cifar")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--baseline", default="percentile", choices=[preset for preset in BITS_PRESETS if preset != METHOD])
    p.add_argument("--num-val", type=int, default=5000)
    p.add_argument("--images", default="val", choices=["val", "train"],
                   help="score on the validation images (default) or on the training part's unseen ones")
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--report-only", action="store_true", help="render the results file's seeds, run nothing")
    p.add_argument("--name", help="stem of the results files in bench/results (default: image_bootstrap_<model>_w<bits>"
                                  "_<baseline>[_train]); another one starts afresh beside the stored seeds, e.g. "
                                  "for the runs of another library default")
    args = p.parse_args(argv)
    if args.images == "train" and not set(args.seeds) <= set(CALIBRATION_SEEDS):
        seeds = f"{CALIBRATION_SEEDS.start}-{CALIBRATION_SEEDS.stop - 1}"
        p.error(f"--images train scores images that no seed in {seeds} calibrates on: pass seeds from that range.")
    suffix = "_train" if args.images == "train" else ""
    stem = args.name or f"image_bootstrap_{args.model}_w{args.bits}_{args.baseline}{suffix}"
    out = REPO / "bench" / "results" / stem
    record = load_results(out.with_suffix(".json"))
    record.update(model=args.model, bits=args.bits, baseline=args.baseline, images=args.images)
    record.setdefault("commands", [])
    if record.setdefault("num_val", args.num_val) != args.num_val:
        raise SystemExit(f"{out.with_suffix('.json')} holds runs on {record['num_val']} validation images: pass "
                         f"--num-val {record['num_val']}, or move the file away to start over with {args.num_val}.")
    if not args.report_only:
        command = shlex.join(["python", "bench/image_bootstrap.py", *(argv if argv is not None else sys.argv[1:])])
        if command not in record["commands"]:
            record["commands"].append(command)
        done, scored = {r["seed"] for r in record["runs"]}, {}
        for seed in args.seeds:
            if seed not in done:
                run_seed(record, seed, scored)
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
