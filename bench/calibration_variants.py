"""Methods without reconstruction under config variants, on many seeds and more images than the validation set:
does a change to ADFQ's calibration (or the baselines') move Top-1 by more than the noise at 6-8 bits?

Each seed calibrates ADFQ without reconstruction under every ``--variants`` entry and each baseline (MinMax,
Percentile) under every ``--baseline-variants`` entry, on the same 1,024 images, and scores every run on the 5,000
validation images and on the ~35,000 training-part images that no calibration seed 0-9 draws (``image_bootstrap.py``
explains that set). A variant is ``NAME=JSON`` (``ADFQConfig`` fields); ``default={}`` is the library's config.

    python bench/calibration_variants.py --bits 6 --seeds 0 1 --variants 'default={}' \\
        'init1024={"init_samples": 1024}' --baseline-variants 'default={}'

Seeds 0-9 draw their images from the training part as every benchmark does; seeds from 10 on draw from the images
seeds 0-9 draw, so that no seed calibrates on a scored image. Each run is one line of a ``runs_*.jsonl`` file in
``--out`` with its per-image correctness; runs already there are not run again. ``--device cuda --jobs N`` runs N
seeds at a time on one GPU. ``--report-only`` renders ``report.md`` there.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

from harness import REPO, kl_to_fp, logits_on, quantized_copy
from image_bootstrap import CALIBRATION_SEEDS, NUM_CALIB, bootstrap_interval, scoring_split, seed_standard_error
from report import BITS_PRESETS, LABELS, cell

from adfq_lightning.io import atomic_write

METHOD, BASELINES = "adfq_init", ("minmax", "percentile")


def run_key(model: str, preset: str, variant: str, bits: int, seed: int) -> str:
    return f"{model}|{preset}|{variant}|{bits}|{seed}"


def parse_variants(entries: list) -> dict:
    """``NAME=JSON`` entries as ``{name: changes}``, checked against ``ADFQConfig`` before anything runs."""
    from adfq_lightning import ADFQConfig

    variants = {}
    for entry in entries:
        name, _, changes = entry.partition("=")
        try:
            variants[name] = json.loads(changes)
            if not isinstance(variants[name], dict):
                raise TypeError(f"{changes!r} is not a JSON object")
            ADFQConfig(**variants[name])
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise SystemExit(f"variant {entry!r}: {str(err).rstrip('.')}. Write NAME=JSON with ADFQConfig fields, "
                             "e.g. 'init1024={\"init_samples\": 1024}'.")
    return variants


def pack_bits(hits) -> str:
    """Per-image correctness (bool tensor) as base64 of its packed bits: a few kB per run."""
    import numpy as np

    return base64.b64encode(np.packbits(hits.cpu().numpy()).tobytes()).decode()


def unpack_bits(text: str, count: int):
    import numpy as np
    import torch

    return torch.from_numpy(np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:count].astype(bool))


def model_and_images(model_name: str, seed: int):
    """The float model, ``seed``'s transformed calibration images, and the two scored sets as (images, labels)."""
    import timm.data

    from adfq_lightning.data import calibration_indices, cifar10_eval_transform
    from adfq_lightning.zoo import create_reference_model

    model = create_reference_model(model_name, pretrained=True).eval()
    transform = cifar10_eval_transform(timm.data.resolve_data_config(model=model))
    split = scoring_split()
    pool = split.train if seed in CALIBRATION_SEEDS else split.drawn.unique()
    calib = calibration_indices(split.data.labels, NUM_CALIB, seed, candidates=pool)
    scored = {name: (transform(split.data.images[idx]), split.data.labels[idx])
              for name, idx in (("val", split.val), ("train", split.unseen))}
    return model, transform(split.data.images[calib]), scored


def run_seed(model_name: str, seed: int, cells: list, out: str, device: str, stop_at: float | None) -> int:
    """Calibrate and score each ``(preset, variant, changes, bits)`` of ``cells`` on ``seed``, one jsonl line each,
    until the wall-clock time ``stop_at``; returns how many ran."""
    import torch

    torch.set_num_threads(1)
    float_model, calib, scored = model_and_images(model_name, seed)
    float_model, calib = float_model.to(device), calib.to(device)
    scored = {k: (x.to(device), y.to(device)) for k, (x, y) in scored.items()}
    fp = {k: logits_on(float_model, x, 1000) for k, (x, _) in scored.items()}
    path = os.path.join(out, f"runs_{model_name}_s{seed}.jsonl")
    for n, (preset, variant, changes, bits) in enumerate(cells):
        if stop_at is not None and time.time() > stop_at:
            return n
        t0 = time.perf_counter()
        model = quantized_copy(float_model, preset, bits, seed, calib, **changes)
        record = {"key": run_key(model_name, preset, variant, bits, seed), "model": model_name, "preset": preset,
                  "variant": variant, "changes": changes, "bits": bits, "seed": seed, "device": device,
                  "torch": torch.__version__, "calib_seconds": round(time.perf_counter() - t0, 2)}
        for name, (x, y) in scored.items():
            logits = logits_on(model, x, 1000)
            hits = logits.argmax(1) == y
            record[name] = {"top1": float(hits.double().mean()) * 100, "hits": pack_bits(hits), "count": len(y),
                            "agreement": float((logits.argmax(1) == fp[name].argmax(1)).double().mean()) * 100,
                            "kl_to_fp": kl_to_fp(logits, fp[name])}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{model_name} s{seed} {preset} {variant} W{bits}: val {record['val']['top1']:.2f} "
              f"train {record['train']['top1']:.2f} ({record['calib_seconds']:.0f} s)", flush=True)
    return len(cells)


def load_runs(out: Path) -> dict:
    runs = {}
    for path in sorted(out.glob("runs_*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when a run was killed: that run is run again
                continue
            runs[record["key"]] = record
    return runs


class Pairing(NamedTuple):
    """ADFQ under one variant and the better baseline on the seeds where all three methods ran, as per-image
    correctness on the training-part images (seeds x images), with both sides' runs by seed."""

    seeds: list
    baseline: str
    against: str
    ours: dict
    theirs: dict

    def hits(self, side: str):
        import torch

        rs = getattr(self, side)
        return torch.stack([unpack_bits(rs[s]["train"]["hits"], rs[s]["train"]["count"]) for s in self.seeds]).double()


def pairing(runs: dict, model: str, bits: int, variant: str) -> Pairing | None:
    """ADFQ under ``variant`` against the better of the baselines that ran (by training-part Top-1), under the same
    variant name if they ran it, else ``default``; None below two common seeds."""
    import statistics

    def by_seed(preset: str, name: str) -> dict:
        return {r["seed"]: r for r in runs.values()
                if (r["model"], r["bits"], r["preset"], r["variant"]) == (model, bits, preset, name)}

    ours = by_seed(METHOD, variant)
    ran = [p for p in BASELINES if by_seed(p, "default")]
    against = variant if all(by_seed(p, variant) for p in ran) else "default"
    theirs = {p: by_seed(p, against) for p in ran}
    seeds = sorted(set(ours).intersection(*theirs.values())) if theirs else []
    if len(seeds) < 2:
        return None
    baseline = max(ran, key=lambda p: statistics.mean(theirs[p][s]["train"]["top1"] for s in seeds))
    return Pairing(seeds, baseline, against, ours, theirs[baseline])


def gap_line(pair: Pairing, variant: str, resamples: int) -> str:
    """One row of the gap table: ADFQ minus the better baseline, on the training-part images and on validation."""
    import statistics

    diff = (pair.hits("ours") - pair.hits("theirs")) * 100
    val_gap = [pair.ours[s]["val"]["top1"] - pair.theirs[s]["val"]["top1"] for s in pair.seeds]
    low, high, _ = bootstrap_interval(diff, resamples)
    return (f"| {variant} | {LABELS[pair.baseline]} ({pair.against}) | {len(pair.seeds)} | "
            f"**{float(diff.mean()):+.2f}** | {seed_standard_error(diff.mean(1).tolist()):.2f} | {low:+.2f} to "
            f"{high:+.2f} | {statistics.mean(val_gap):+.2f} ± {seed_standard_error(val_gap):.2f} |")


def class_trades(pair: Pairing, variant: str, labels, classes: list) -> list[str]:
    """ADFQ's gap under ``variant`` class by class, on the first and the second half of the seeds separately: a
    difference that repeats in both halves is the methods' own preference between classes, not calibration luck."""
    diff = (pair.hits("ours") - pair.hits("theirs")) * 100
    half = len(pair.seeds) // 2
    lines = [f"ADFQ ({variant}) minus {LABELS[pair.baseline]} ({pair.against}) class by class (Top-1 within the "
             "class's training-part images), "
             f"seeds {pair.seeds[0]}-{pair.seeds[half - 1]} / seeds {pair.seeds[half]}-{pair.seeds[-1]}:", "",
             "| class | images | first half | second half |", "|---:|---:|---:|---:|"]
    for c in labels.unique().tolist():
        k = labels == c
        lines.append(f"| {classes[c]} | {int(k.sum())} | {float(diff[:half, k].mean()):+.2f} | "
                     f"{float(diff[half:, k].mean()):+.2f} |")
    return lines + ["", f"All classes: {float(diff[:half].mean()):+.2f} / {float(diff[half:].mean()):+.2f}.", ""]


def report(runs: dict, resamples: int, commands: list) -> list[str]:
    split = scoring_split()
    labels = split.data.labels[split.unseen]
    lines = ["# Methods without reconstruction under config variants", "", "Produced by:", ""] + [
             f"- `{c}`" for c in commands] + [
             "", "Top-1 % mean ± std over seeds on the 5,000 validation images and on the training-part images that "
             "no seed 0-9 calibrates on; agreement with FP32's predictions and KL(FP32 ‖ quantized) on the latter. "
             "*Gap*: ADFQ minus the better baseline, paired seed by seed on the training-part images, with the seed by "
             f"seed standard error and a 95 % interval resampling seeds and images together ({resamples} times); the "
             "last column is the same gap on validation, ± its seed standard error.", ""]
    for model, bits in sorted({(r["model"], r["bits"]) for r in runs.values()}):
        group = [r for r in runs.values() if (r["model"], r["bits"]) == (model, bits)]
        lines += [f"## {model} W{bits}A{bits}", "",
                  "| method | variant | seeds | val Top-1 | train Top-1 | train agreement | train KL |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for preset, variant in sorted({(r["preset"], r["variant"]) for r in group},
                                      key=lambda pv: (BITS_PRESETS.index(pv[0]), pv[1] != "default", pv[1])):
            rs = [r for r in group if (r["preset"], r["variant"]) == (preset, variant)]
            lines.append(f"| {LABELS[preset]} | {variant} | {len(rs)} | {cell([r['val']['top1'] for r in rs])} | "
                         f"{cell([r['train']['top1'] for r in rs])} | "
                         f"{cell([r['train']['agreement'] for r in rs])} | "
                         f"{sum(r['train']['kl_to_fp'] for r in rs) / len(rs):.4f} |")
        variants = sorted({r["variant"] for r in group if r["preset"] == METHOD})
        pairs = {v: pair for v in variants if (pair := pairing(runs, model, bits, v)) is not None}
        if pairs:
            lines += ["", "| ADFQ variant | against | seeds | gap, train | seed SE | 95 % interval | gap, val |",
                      "|---|---|---:|---:|---:|---:|---:|"] + [gap_line(p, v, resamples) for v, p in pairs.items()]
        lines.append("")
        for variant, pair in pairs.items():
            if len(pair.seeds) >= 4:
                lines += class_trades(pair, variant, labels, split.data.classes)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deit_cifar"])
    p.add_argument("--bits", type=int, nargs="+", default=[6])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    p.add_argument("--variants", nargs="+", default=["default={}"], help="ADFQ's variants, NAME=JSON")
    p.add_argument("--baseline-variants", nargs="+", default=["default={}"], help="MinMax's and Percentile's")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES,
                   help="which baselines run (the report compares with the better of those run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="seeds calibrated at a time, each in its own process")
    p.add_argument("--time-budget", type=float, help="seconds after which no further run starts")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "calibration_variants")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--report-only", action="store_true", help="render the runs already made, run nothing")
    args = p.parse_args(argv)
    commands_file = args.out / "commands.txt"
    if not args.report_only:
        ours, theirs = parse_variants(args.variants), parse_variants(args.baseline_variants)
        args.out.mkdir(parents=True, exist_ok=True)
        command = shlex.join(["python", "bench/calibration_variants.py", *(argv if argv is not None else sys.argv[1:])])
        with open(commands_file, "a") as f:
            f.write(command + "\n")
        done = set(load_runs(args.out))
        wanted = [(METHOD, name, changes) for name, changes in ours.items()] + [
                  (preset, name, changes) for preset in args.baselines for name, changes in theirs.items()]
        tasks = [(model, seed, cells) for seed in args.seeds for model in args.models
                 if (cells := [(preset, name, changes, bits) for bits in args.bits for preset, name, changes in wanted
                               if run_key(model, preset, name, bits, seed) not in done])]
        stop_at = None if args.time_budget is None else time.time() + args.time_budget
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for future in [pool.submit(run_seed, model, seed, cells, str(args.out), args.device, stop_at)
                           for model, seed, cells in tasks]:
                future.result()
    runs = load_runs(args.out)
    if not runs:
        raise SystemExit(f"{args.out} holds no runs: run without --report-only first.")
    commands = commands_file.read_text().splitlines() if commands_file.is_file() else []
    lines = report(runs, args.resamples, list(dict.fromkeys(commands)))
    atomic_write(args.out / "report.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
