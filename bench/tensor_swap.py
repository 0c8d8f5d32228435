"""Which tensor's grid costs ADFQ (no reconstruction) its Top-1 against Percentile: ADFQ with one kind of quantizer
at a time replaced by Percentile's, calibrated on the same images, scored on the ~35,000 training-part images that
no calibration seed 0-9 draws (``image_bootstrap.py`` explains that set; single tensors move the 5,000 validation
images' Top-1 by more than the gap in question). A swap that gives back the gap names the tensor to fix.

    python bench/tensor_swap.py --model deit_cifar --bits 6 --seeds 0 1 2

``--ranges KIND`` compares the two methods' grids of one kind instead (their clipping ranges and steps, per-tensor
uniform grids only), calibrating on the first seed and scoring nothing.

One file per seed in ``bench/results/tensor_swap/`` (resumable; two commands with disjoint seeds can go side by
side); ``--report-only`` renders ``tensor_swap_<model>_w<bits>.md`` from the seeds there, with each swap's change
class by class as well. A seed is two calibrations
and one pass over the images per swap: about half an hour on one core for DeiT.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from harness import REPO, logits_on, quantized_copy, reference_model_and_images
from image_bootstrap import (CALIBRATION_SEEDS, NUM_CALIB, bootstrap_interval, pack, scoring_split,
                             seed_standard_error, unpack, unseen_training_images)

from adfq_lightning.io import atomic_write

RESULTS = REPO / "bench" / "results"
RUNS = RESULTS / "tensor_swap"
METHOD, DONOR = "adfq_init", "percentile"


def seed_path(model: str, bits: int, seed: int):
    return RUNS / f"{model}_w{bits}_s{seed}.json"


def quantizers_by_kind(model) -> dict:
    """Outermost quantizers of ``model`` by name, grouped by kind: ``weights`` or the activation role."""
    from adfq_lightning.quantizers import AdaRoundQuantizer, outermost_quantizers

    outermost = set(outermost_quantizers(model))
    kinds: dict = {}
    for name, module in model.named_modules():
        if module in outermost:
            kind = "weights" if isinstance(module, AdaRoundQuantizer) else module.role
            kinds.setdefault(kind, []).append(name)
    return kinds


def swapped(model, donor, names: list):
    """``model`` with the quantizers at ``names`` replaced by ``donor``'s (the same float model, quantized another
    way): returns the originals, to put back with the same call."""
    originals = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent, donor_parent = model.get_submodule(parent_name), donor.get_submodule(parent_name)
        originals.append(getattr(parent, attr))
        setattr(parent, attr, getattr(donor_parent, attr))
    return originals


def put_back(model, names: list, originals: list) -> None:
    for name, original in zip(names, originals):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, original)


def run_seed(model_name: str, bits: int, seed: int, scored: dict, command: str) -> None:
    """Per-image correctness of ADFQ, Percentile and ADFQ with each kind swapped to Percentile's, all calibrated on
    ``seed``'s images; FP32's once per model."""
    float_model, images, _, _ = reference_model_and_images(model_name, NUM_CALIB, 0, seed)
    if not scored:
        scored["images"], scored["labels"] = unseen_training_images(float_model)
    x, y = scored["images"], scored["labels"]
    fp_path = RUNS / f"{model_name}_fp.json"
    if not fp_path.is_file():
        atomic_write(fp_path, json.dumps({"train": pack(logits_on(float_model, x).argmax(1) == y)}).encode())
    ours = quantized_copy(float_model, METHOD, bits, seed, images)
    donor = quantized_copy(float_model, DONOR, bits, seed, images)
    kinds = quantizers_by_kind(ours)
    if kinds != quantizers_by_kind(donor):
        raise SystemExit(f"{METHOD} and {DONOR} quantize different tensors of {model_name}: nothing to swap.")
    hits = {METHOD: pack(logits_on(ours, x).argmax(1) == y), DONOR: pack(logits_on(donor, x).argmax(1) == y)}
    for kind, names in sorted(kinds.items()):
        originals = swapped(ours, donor, names)
        hits[kind] = pack(logits_on(ours, x).argmax(1) == y)
        put_back(ours, names, originals)
        print(f"seed {seed}: {kind} swapped", flush=True)
    record = {"command": command, "model": model_name, "bits": bits, "seed": seed, "hits": hits}
    atomic_write(seed_path(model_name, bits, seed), json.dumps(record).encode())


def grid_ranges(model_name: str, bits: int, seed: int, kind: str) -> list[str]:
    """The clipping range and step of each ``kind`` quantizer under both methods, calibrated on ``seed``'s images."""
    from adfq_lightning.quantizers import UniformQuantizer

    float_model, images, _, _ = reference_model_and_images(model_name, NUM_CALIB, 0, seed)
    ours = quantized_copy(float_model, METHOD, bits, seed, images)
    donor = quantized_copy(float_model, DONOR, bits, seed, images)
    lines = [f"# {kind} grids of ADFQ without reconstruction and Percentile: {model_name} W{bits}A{bits}, calibration "
             f"seed {seed}", "", f"`python bench/tensor_swap.py --model {model_name} --bits {bits} --seeds {seed} "
             f"--ranges {kind}`", "",
             "| quantizer | ADFQ family | ADFQ range | Percentile range | step, ADFQ / Percentile |",
             "|---|---|---|---|---:|"]
    for name in quantizers_by_kind(ours).get(kind, []):
        a, b = ours.get_submodule(name), donor.get_submodule(name)
        family, a = getattr(a, "family", "uniform"), getattr(a, "chosen", a)
        if not all(isinstance(q, UniformQuantizer) and q.granularity == "tensor" for q in (a, b)):
            raise SystemExit(f"{name}: --ranges compares per-tensor uniform grids; this {kind} grid is not one.")
        ranges = [(float(-q.zero_point * q.scale.abs()), float((q.levels - 1 - q.zero_point) * q.scale.abs()))
                  for q in (a, b)]
        lines.append(f"| {name} | {family} | {ranges[0][0]:.4f} to {ranges[0][1]:.4f} | {ranges[1][0]:.4f} to "
                     f"{ranges[1][1]:.4f} | {float(a.scale.abs() / b.scale.abs()):.4f} |")
    return lines


def report(model_name: str, bits: int, resamples: int) -> list[str]:
    import torch

    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob(f"{model_name}_w{bits}_s*.json"))]
    if not records:
        raise SystemExit(f"no seeds in {RUNS} for {model_name} W{bits}: run without --report-only first.")
    records.sort(key=lambda r: r["seed"])
    fp = unpack(json.loads((RUNS / f"{model_name}_fp.json").read_text())["train"]).double()
    hits = {k: torch.stack([unpack(r["hits"][k]) for r in records]).double() for k in records[0]["hits"]}
    ours, theirs = hits.pop(METHOD), hits.pop(DONOR)
    gap = float((theirs - ours).mean()) * 100
    commands = sorted({r["command"] for r in records})
    lines = [f"# ADFQ without reconstruction with one kind of quantizer swapped to Percentile's: {model_name} "
             f"W{bits}A{bits}", "", "Produced by:", ""] + [f"- `{c}`" for c in commands] + [
             "", f"Top-1 % on the {ours.shape[1]} training-part images that no calibration seed 0-9 draws (FP32 "
             f"{fp.mean() * 100:.2f}), mean over seeds {', '.join(str(r['seed']) for r in records)}; each seed "
             "calibrates both methods on its own 1,024 images and swaps within that pair. *Change*: the swap's "
             "Top-1 minus ADFQ's, seed by seed standard error and a 95 % interval resampling seeds and images "
             f"together ({resamples} times). *Share of the gap*: the change over Percentile's lead "
             f"({gap:+.2f}).", "",
             "| variant | Top-1 | change | seed SE | 95 % interval | share of the gap |",
             "|---|---:|---:|---:|---:|---:|",
             f"| ADFQ, no reconstruction | {ours.mean() * 100:.2f} | | | | |",
             f"| Percentile (per-tensor) | {theirs.mean() * 100:.2f} | {gap:+.2f} | "
             f"{seed_se(theirs - ours):.2f} | {interval(theirs - ours, resamples)} | 100 % |"]
    for kind, swap in hits.items():
        change = float((swap - ours).mean()) * 100
        share = f"{change / gap * 100:.0f} %" if gap else "–"
        lines.append(f"| ADFQ, {kind} swapped | {swap.mean() * 100:.2f} | {change:+.2f} | {seed_se(swap - ours):.2f} "
                     f"| {interval(swap - ours, resamples)} | {share} |")
    return lines + [""] + class_table(ours, {"Percentile": theirs, **hits})


def class_table(ours, others: dict) -> list[str]:
    """Each variant's change against ADFQ within each class's images (mean over seeds): what a swap trades between
    classes, which its net change over all images hides."""
    split = scoring_split()
    labels, classes = split.data.labels[split.unseen], split.data.classes
    lines = ["Change within each class's images (Top-1 points, mean over the seeds):", "",
             "| class | " + " | ".join(others) + " |", "|---|" + "---:|" * len(others)]
    for c, name in enumerate(classes):
        k = labels == c
        lines.append(f"| {name} | " + " | ".join(f"{float((v[:, k] - ours[:, k]).mean()) * 100:+.2f}"
                                               for v in others.values()) + " |")
    return lines


def seed_se(diff) -> float:
    """Standard error over seeds of the mean difference (percentage points); ``diff`` is seeds x images."""
    return seed_standard_error((diff.mean(1) * 100).tolist())


def interval(diff, resamples: int) -> str:
    low, high, _ = bootstrap_interval(diff * 100, resamples)
    return f"{low:+.2f} to {high:+.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_cifar")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--report-only", action="store_true", help="render the seeds already run, run nothing")
    p.add_argument("--ranges", metavar="KIND", help="compare the two methods' grids of KIND on the first seed instead")
    args = p.parse_args(argv)
    if not set(args.seeds) <= set(CALIBRATION_SEEDS):
        seeds = f"{CALIBRATION_SEEDS.start}-{CALIBRATION_SEEDS.stop - 1}"
        p.error(f"the scored images are those no seed in {seeds} calibrates on: pass seeds from that range.")
    if args.ranges:
        lines = grid_ranges(args.model, args.bits, args.seeds[0], args.ranges)
        atomic_write(RESULTS / f"tensor_swap_{args.model}_w{args.bits}_{args.ranges}_ranges.md",
                     ("\n".join(lines) + "\n").encode())
        print("\n".join(lines))
        return 0
    if not args.report_only:
        RUNS.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "bench/tensor_swap.py", *(argv if argv is not None else sys.argv[1:])])
        scored: dict = {}
        for seed in args.seeds:
            if not seed_path(args.model, args.bits, seed).is_file():
                run_seed(args.model, args.bits, seed, scored, command)
    lines = report(args.model, args.bits, args.resamples)
    atomic_write(RESULTS / f"tensor_swap_{args.model}_w{args.bits}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
