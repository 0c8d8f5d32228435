#!/usr/bin/env python
"""Deployment of the shipped W4A4 ViT: file sizes, parity of every export format, and CPU inference time.

It quantizes ``vit_cifar`` with the shipped config's recipe at ``--iters`` (the bundle's 1,024 calibration images),
exports the safetensors artifact, the ``torch.export`` program and the ONNX model, and measures on the bundle's
5,000 validation images:

* size on disk against the FP32 and FP16 state_dicts;
* parity: maximum absolute logit difference to the fake-quant model and Top-1 of each format;
* inference time per batch of 64 (median of ``--repeats``): FP32 eager, fake-quant eager, deployed eager,
  ``torch.compile`` of the deployed model, the ``torch.export`` program and ONNX Runtime.

    python -m bench export            # writes bench/results/export.json; python -m bench report renders it

Timings are from one process on one machine; compare them as ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import REPO, machine_info


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench export", description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=1000,
                   help="reconstruction iterations per module: the shipped W4A4 config's budget (an export's size "
                        "and agreement do not depend on it)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    from adfq_lightning import ADFQConfig, quantize
    from adfq_lightning.atomic import atomic_write
    from adfq_lightning.data import cifar10_eval_transform, load_bundle
    from adfq_lightning.export import (deploy, export_onnx, export_program, export_quantized, load_exported,
                                       load_program, onnx_session)
    from adfq_lightning.zoo import create_reference_model

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
        artifact, program, ort = load_exported(paths["safetensors"]), load_program(paths["pt2"]), onnx_session(paths["onnx"])
        run_onnx = lambda x: ort.run(None, {"images": x.numpy()})[0]  # noqa: E731
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
              "command": shlex.join(["python", "-m", "bench", "export", *(argv if argv is not None else sys.argv[1:])])}
    atomic_write(args.out / "export.json", (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result["parity"], indent=1))
    print("python -m bench report renders the tables", flush=True)
    return 0
