"""Where a model's distance to FP32 comes from: KL(FP32 || quantized) with one kind of quantizer switched on at a
time, all others calibrated but off, for ADFQ without reconstruction (q/k/v grids by L2.4 and by the squared
error) and Percentile. It found the q/k/v grid's cost at 4-8 bits (docs/benchmark.md, *Every bit width*). Top-1
beside it, and the images on which exactly one of a method and Percentile is right: where the two tie on Top-1
within the seeds' spread, that count says whether the gap is more than the luck of which images flip.

    python bench/quantizer_split.py --model deit_cifar --bits 6 --seed 0
    python bench/quantizer_split.py --model deit_cifar --bits 7 --seed 0 --num-val 5000 --name quantizer_split_deit_cifar_w7_val5000
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from harness import REPO, kl_to_fp, logits_on, quantized_copy, reference_model_and_images

from adfq_lightning.io import atomic_write

METHODS = {"ADFQ, no reconstruction (q/k/v L2.4, default)": ("adfq_init", {}),
           "ADFQ, no reconstruction (q/k/v squared error)": ("adfq_init", {"qkv_error_p": 2.0}),
           "Percentile (per-tensor)": ("percentile", {})}
BASELINE = "Percentile (per-tensor)"


def two_sided_sign_test(wins: int, losses: int) -> float:
    """Exact p-value of ``wins`` against ``losses`` under a fair coin (McNemar's test on the discordant images)."""
    from math import comb

    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def split(model_name: str, bits: int, seed: int, num_val: int) -> tuple[dict, dict, dict, float]:
    """KL to FP32 and Top-1 per method and quantizer kind, each method's per-image correctness (all quantizers on),
    and FP32's Top-1."""
    from adfq_lightning.quantizers import AdaRoundQuantizer, outermost_quantizers

    float_model, images, val, labels = reference_model_and_images(model_name, 1024, num_val, seed)
    fp = logits_on(float_model, val)
    kl, top1, correct = {}, {}, {}
    for label, (preset, changes) in METHODS.items():
        model = quantized_copy(float_model, preset, bits, seed, images, **changes)
        quantizers = [(q, "weights" if isinstance(q, AdaRoundQuantizer) else q.role) for q in outermost_quantizers(model)]
        kl[label], top1[label] = {}, {}
        for kind in ["all", "weights", "activations"] + sorted({k for _, k in quantizers} - {"weights"}):
            for q, k in quantizers:
                q.enabled = kind == "all" or k == kind or (kind == "activations" and k != "weights")
            logits = logits_on(model, val)
            kl[label][kind] = kl_to_fp(logits, fp)
            hits = logits.argmax(1) == labels
            top1[label][kind] = float(hits.float().mean()) * 100
            if kind == "all":
                correct[label] = hits
    return kl, top1, correct, float((fp.argmax(1) == labels).float().mean()) * 100


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_cifar")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-val", type=int, default=2000)
    p.add_argument("--name", help="results file name without suffix (default quantizer_split_<model>_w<bits>)")
    args = p.parse_args(argv)
    kl, top1, correct, fp_top1 = split(args.model, args.bits, args.seed, args.num_val)
    kinds = list(kl[BASELINE])
    command = shlex.join(["python", "bench/quantizer_split.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# KL(FP32 ‖ quantized) and Top-1 by quantizer kind: {args.model} W{args.bits}A{args.bits}, calibration "
             f"seed {args.seed}, first {args.num_val} validation images", "", f"`{command}`", "",
             "Each column switches on only that kind of quantizer (all calibrated as in the full model).", ""]
    for title, table, fmt in (("KL(FP32 ‖ quantized)", kl, ".5f"), ("Top-1 %", top1, ".2f")):
        lines += [f"{title}:", "", "| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
        lines += [f"| {label} | " + " | ".join(f"{row[k]:{fmt}}" for k in kinds) + " |" for label, row in table.items()]
        lines.append("")
    lines.append(f"FP32 Top-1 {fp_top1:.2f}. All quantizers on, the images on which exactly one of a method "
                 f"and {BASELINE} is right, and the exact two-sided sign test (McNemar) of that split:")
    lines.append("")
    paired = {}
    for label in correct:  # in METHODS' order, the baseline left out
        if label == BASELINE:
            continue
        wins = int((correct[label] & ~correct[BASELINE]).sum())
        losses = int((~correct[label] & correct[BASELINE]).sum())
        paired[label] = {"wins": wins, "losses": losses, "p": two_sided_sign_test(wins, losses)}
        lines.append(f"- {label}: right alone on {wins} images, {BASELINE} right alone on {losses}; "
                     f"p = {paired[label]['p']:.2f}")
    out = REPO / "bench" / "results" / f"{args.name or f'quantizer_split_{args.model}_w{args.bits}'}.md"
    record = {"args": vars(args), "kl_to_fp": kl, "top1": top1, "against_percentile": paired}
    atomic_write(out.with_suffix(".json"), (json.dumps(record, indent=1) + "\n").encode())
    atomic_write(out, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
