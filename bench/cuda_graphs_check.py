#!/usr/bin/env python
"""Does reconstruction with CUDA graphs (``cuda_graphs=True``) give what it gives without them? On a GPU.

For each shipped reference model (the embedded bundle's images, offline) it quantizes twice on the same
device, with and without graphs, and compares the two quantized models: every parameter and buffer (how
many are bit-identical, the largest difference), their logits on the validation images, and Top-1.
``harden_at`` below 1 makes every module capture twice (soft rounding, then hard), so that the recapture
is checked too. It also times both reconstructions.

    python bench/cuda_graphs_check.py                   # needs a CUDA device

Writes ``cuda_graphs_check.json`` and ``.md`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from harness import REPO, machine_info
from torchmetrics.functional.classification import multiclass_accuracy

from adfq_lightning import ADFQConfig, quantize
from adfq_lightning.data import cifar10_eval_transform
from adfq_lightning.data.cifar10 import load_bundle
from adfq_lightning.io import atomic_write
from adfq_lightning.zoo import create_reference_model


def quantized(model_name: str, graphs: bool, calib: torch.Tensor, val: torch.Tensor, args) -> dict:
    model = create_reference_model(model_name, pretrained=True).cuda()
    config = ADFQConfig(w_bits=args.bits, a_bits=args.bits, iters=args.iters, batch_size=args.batch_size,
                        harden_at=0.5, cuda_graphs=graphs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize(model, calib.cuda(), config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = torch.cat([model(val[i : i + 1000].cuda()) for i in range(0, len(val), 1000)])
    return {"seconds": seconds, "logits": logits, "state": model.state_dict()}


def compare(model_name: str, calib: torch.Tensor, val: torch.Tensor, labels: torch.Tensor, args) -> dict:
    eager, graphed = (quantized(model_name, g, calib, val, args) for g in (False, True))
    pairs = [(eager["state"][k], v) for k, v in graphed["state"].items() if v.is_floating_point()]
    identical = sum(bool(torch.equal(a, b)) for a, b in pairs)
    labels = labels.cuda()
    same = eager["logits"].argmax(1) == graphed["logits"].argmax(1)
    top1 = {name: float(multiclass_accuracy(r["logits"], labels, num_classes=10, average="micro")) * 100
            for name, r in (("eager", eager), ("graphed", graphed))}
    return {"model": model_name, "tensors": len(pairs), "bit_identical": identical,
            "max_abs_diff": max(float((a - b).abs().max()) for a, b in pairs),
            "logits_max_abs_diff": float((eager["logits"] - graphed["logits"]).abs().max()),
            "prediction_agreement": float(same.float().mean()) * 100,
            "top1_eager": top1["eager"], "top1_graphed": top1["graphed"],
            "seconds_eager": eager["seconds"], "seconds_graphed": graphed["seconds"]}


def render(data: dict) -> str:
    m = data["machine"]
    lines = ["# Reconstruction with and without CUDA graphs", "", f"Produced by `{data['command']}` on "
             f"{m.get('gpu')} ({m.get('cpu_count')} CPUs), torch {m.get('torch')}: W{data['bits']}A{data['bits']}, "
             f"{data['num_calib']} calibration images, {data['iters']} iterations per module (rounding hardened at "
             f"half, so each module is captured twice), batch {data['batch_size']}; Top-1 on the bundle's "
             f"{data['num_val']} validation images.", "",
             "| model | tensors bit-identical | largest difference | logits largest difference | same prediction % | "
             "Top-1 eager / graphed | reconstruction s eager / graphed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["runs"]:
        lines.append(f"| {r['model']} | {r['bit_identical']} / {r['tensors']} | {r['max_abs_diff']:.2e} | "
                     f"{r['logits_max_abs_diff']:.2e} | {r['prediction_agreement']:.2f} | {r['top1_eager']:.2f} / "
                     f"{r['top1_graphed']:.2f} | {r['seconds_eager']:.1f} / {r['seconds_graphed']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_cifar", "deit_cifar", "swin_cifar"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--num-val", type=int, default=5000)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device: CUDA graphs need one (run it on a GPU machine).")
    bundle = load_bundle()
    transform = cifar10_eval_transform()
    calib, val = transform(bundle["calib_images"][: args.num_calib]), transform(bundle["val_images"][: args.num_val])
    command = ["python", "bench/cuda_graphs_check.py", *(argv if argv is not None else sys.argv[1:])]
    data = {"command": shlex.join(command),
            "machine": machine_info("cuda"), "bits": args.bits, "num_calib": args.num_calib, "num_val": args.num_val,
            "iters": args.iters, "batch_size": args.batch_size, "runs": []}
    for name in args.models:
        data["runs"].append(compare(name, calib, val, bundle["val_labels"][: args.num_val], args))
        print(json.dumps(data["runs"][-1]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "cuda_graphs_check.json", json.dumps(data, indent=1).encode())
        atomic_write(args.out / "cuda_graphs_check.md", render(data).encode())
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
