#!/usr/bin/env python
"""Deployment of the shipped W4A4 ViT: file sizes, parity of every export format, and CPU inference time.

It quantizes ``vit_cifar`` with the default run's recipe at ``--iters`` (the bundle's 1,024 calibration images),
exports the safetensors artifact, the ``torch.export`` program and the ONNX model, and measures on the bundle's
5,000 validation images:

* size on disk against the FP32 and FP16 state_dicts;
* parity: maximum absolute logit difference to the fake-quant model and Top-1 of each format;
* inference time per batch of 64 (median of ``--repeats``): FP32 eager, fake-quant eager, deployed eager,
  ``torch.compile`` of the deployed model, the ``torch.export`` program and ONNX Runtime.

    python bench/export_bench.py            # writes bench/results/export.json and export.md

Timings are from one process on this machine; compare them as ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import REPO, machine_info

from adfq_lightning import ADFQConfig, quantize
from adfq_lightning.data import cifar10_eval_transform, load_bundle
from adfq_lightning.export import deploy, export_onnx, export_program, export_quantized, load_exported, load_program, onnx_session
from adfq_lightning.io import atomic_write
from adfq_lightning.zoo import create_reference_model


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=1000,
                   help="reconstruction iterations per module: the default run's budget (an export's size and "
                        "agreement do not depend on it)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle()
    transform = cifar10_eval_transform()
    calib, val, labels = transform(bundle["calib_images"]), transform(bundle["val_images"]), bundle["val_labels"]
    float_model = create_reference_model("vit_cifar", pretrained=True)
    config = ADFQConfig(w_bits=4, a_bits=4, iters=args.iters)
    model = quantize(copy.deepcopy(float_model), calib, config)

    @torch.no_grad()
    def logits(fn) -> torch.Tensor:
        return torch.cat([torch.as_tensor(fn(val[i : i + 500])) for i in range(0, len(val), 500)])

    def fp_bytes(dtype) -> int:
        buffer = io.BytesIO()
        torch.save({k: v.to(dtype) for k, v in float_model.state_dict().items()}, buffer)
        return len(buffer.getvalue())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"safetensors": export_quantized(model, tmp / "vit.safetensors", config),
                 "pt2": export_program(model, tmp / "vit.pt2", val[:2]),
                 "onnx": export_onnx(model, tmp / "vit.onnx", val[:2])}
        sizes = {k: os.path.getsize(v) for k, v in paths.items()}
        artifact, program, session = load_exported(paths["safetensors"]), load_program(paths["pt2"]), onnx_session(paths["onnx"])
        run_onnx = lambda x: session.run(None, {"images": x.numpy()})[0]  # noqa: E731
        reference = logits(model)
        formats = {"fake-quant (PyTorch)": reference, "safetensors artifact": logits(artifact),
                   "torch.export program": logits(program), "ONNX Runtime": logits(run_onnx)}
        parity = {name: {"max_abs_diff": float((out - reference).abs().max()),
                         "top1": float((out.argmax(1) == labels).float().mean() * 100),
                         "agreement": float((out.argmax(1) == reference.argmax(1)).float().mean() * 100)}
                  for name, out in formats.items()}
        parity["FP32"] = {"top1": float((logits(float_model).argmax(1) == labels).float().mean() * 100)}

        deployed = deploy(copy.deepcopy(model))
        compiled = torch.compile(deployed)
        batch = val[:64]
        with torch.no_grad():
            timings = {"FP32 eager": timed(float_model, batch, args.repeats),
                       "fake-quant eager": timed(model, batch, args.repeats),
                       "deployed eager": timed(deployed, batch, args.repeats),
                       "deployed torch.compile": timed(compiled, batch, args.repeats),
                       "torch.export program": timed(program, batch, args.repeats),
                       "ONNX Runtime": timed(run_onnx, batch, args.repeats)}
    result = {"config": config.to_dict(), "sizes": sizes, "fp32_bytes": fp_bytes(torch.float32),
              "fp16_bytes": fp_bytes(torch.float16), "parity": parity, "seconds_per_batch_64": timings,
              "threads": args.threads, "machine": machine_info(), "loadavg": os.getloadavg()[0],
              "command": "python bench/export_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write(args.out / "export.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write(args.out / "export.md", render(result).encode())
    print(render(result))
    return 0


def render(r: dict) -> str:
    fp32, fp16 = r["fp32_bytes"], r["fp16_bytes"]
    lines = ["# Deploying the shipped W4A4 ViT (vit_cifar)", "", f"Produced by `{r['command'].strip()}` on "
             f"{r['machine']['cpu_count']} CPUs ({r['machine']['cpu_model']}), torch {r['machine']['torch']}, "
             f"{r['threads']} threads (1-min load average {r['loadavg']:.1f}).", "",
             "| file | size | vs FP32 state_dict | vs FP16 |", "|---|---:|---:|---:|",
             f"| FP32 state_dict | {fp32 / 1024:.0f} KiB | 1.00 | |", f"| FP16 state_dict | {fp16 / 1024:.0f} KiB | "
             f"{fp32 / fp16:.2f}x smaller | 1.00 |"]
    for name, size in r["sizes"].items():
        lines.append(f"| W4A4 {name} | {size / 1024:.0f} KiB | {fp32 / size:.2f}x smaller | {fp16 / size:.2f}x smaller |")
    lines += ["", "| model | Top-1 (5,000 val images) | max abs logit diff to fake-quant | same prediction as fake-quant |",
              "|---|---:|---:|---:|"]
    for name, p in r["parity"].items():
        diff = f"{p['max_abs_diff']:.2e}" if "max_abs_diff" in p else "–"
        agree = f"{p['agreement']:.2f} %" if "agreement" in p else "–"
        lines.append(f"| {name} | {p['top1']:.2f} | {diff} | {agree} |")
    base = r["seconds_per_batch_64"]["FP32 eager"]
    lines += ["", "| inference, batch of 64 | ms | vs FP32 eager |", "|---|---:|---:|"]
    for name, seconds in r["seconds_per_batch_64"].items():
        lines.append(f"| {name} | {seconds * 1000:.1f} | {seconds / base:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
