#!/usr/bin/env python
"""Cost model for choosing ``bench/run_benchmark.py --iters`` on a given machine.

Runs one full-ADFQ ``quantize()`` with a few reconstruction iterations per module and times, from the
per-iteration log callback, (a) what does not depend on ``iters`` (cache building, quantizer calibration,
error evaluation: the cost of ``adfq_init``) and (b) one reconstruction step per module. It also times the
FP and quantized forward pass over the validation images. The min/median of repeated measurements make the
estimate robust to other processes sharing the CPU. Prints the predicted benchmark time for a few ``iters``.

    python bench/profile_costs.py --model vit_cifar --iters 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_cifar")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--num-calib", type=int, default=1024)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--untrained", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_import = time.perf_counter()
    import timm

    from adfq_lightning.api import prepare
    from adfq_lightning.config import ADFQConfig
    from adfq_lightning.data import cifar10_eval_transform, load_bundle
    from adfq_lightning.reconstruction import Reconstructor
    from adfq_lightning.zoo import create_reference_model
    t_import = time.perf_counter() - t_import

    bundle = load_bundle()
    model = create_reference_model(args.model, pretrained=not args.untrained)
    tf = cifar10_eval_transform(timm.data.resolve_data_config(model=model))
    calib = tf(bundle["calib_images"][: args.num_calib])
    val = tf(bundle["val_images"][: args.eval_images])

    def eval_time(repeats=3):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                for x in val.split(500):
                    model(x)
            times.append(time.perf_counter() - t)
        return min(times), statistics.median(times)

    fp_eval = eval_time()
    config = ADFQConfig.preset("adfq", w_bits=args.bits, a_bits=args.bits, iters=args.iters)
    model.eval()
    prepare(model, config)
    rec = Reconstructor(model, config, calib, torch.arange(len(calib)), len(calib))
    stamps: list[tuple[str, int, float]] = []
    t0 = time.perf_counter()
    rec.run(log=lambda name, it, terms: stamps.append((name, it, time.perf_counter())))
    total = time.perf_counter() - t0
    # step time = gap between consecutive iterations of the same stage (iteration >= 2)
    steps: dict[str, list[float]] = {}
    for (n0, i0, s0), (n1, i1, s1) in zip(stamps, stamps[1:]):
        if n0 == n1 and i1 == i0 + 1:
            steps.setdefault(n1, []).append(s1 - s0)
    all_steps = [s for v in steps.values() for s in v]
    step_sum_med = sum(statistics.median(v) for v in steps.values())  # one iteration of every module
    step_sum_min = sum(min(v) for v in steps.values())
    measured_steps = sum(all_steps) + sum(  # first step of each stage is not in the gaps: add its median
        statistics.median(v) for v in steps.values())
    fixed = total - measured_steps
    q_eval = eval_time()
    n_stages = len(rec.stages)
    out = {
        "model": args.model, "num_calib": args.num_calib, "threads": args.threads, "iters": args.iters,
        "import_s": t_import, "stages": n_stages, "quantize_total_s": total,
        "fixed_s (≈ adfq_init calibration)": fixed,
        "stage_seconds": {s.name: round(s.stats.get("seconds", 0.0), 2) for s in rec.stages},
        "one_iter_all_modules_s (median)": step_sum_med, "one_iter_all_modules_s (min)": step_sum_min,
        f"fp_eval_{args.eval_images}_s (min, median)": fp_eval,
        f"q_eval_{args.eval_images}_s (min, median)": q_eval,
        "loadavg": __import__("os").getloadavg(),
    }
    print(json.dumps(out, indent=1))
    scale_eval = 5000 / args.eval_images
    print(f"\nprojection for {args.model} (median step, this machine's current load):")
    for iters in (50, 100, 200, 300, 500, 1000):
        print(f"  adfq iters={iters:4d}: quantize ≈ {fixed + iters * step_sum_med:7.1f} s "
              f"(+ 5000-image eval ≈ {q_eval[1] * scale_eval:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
