#!/usr/bin/env python
"""Speed and memory of ADFQ calibration at real sizes: the eight paper models at 224 px, random weights.

For each model it runs the engine stage by stage on random images and records, per module: the seconds of
one reconstruction iteration, the seconds of preparing it (cache, calibration, held-out error) and its
activation-cache size; and for the run: peak memory. It then projects the paper's budget (1,024 images,
3,000 iterations per module, batch 32) from those measurements:

    projected = sum over modules of [prepare_s * 1024 / num_calib + 3000 * iter_s * 32 / batch_size]

(iteration time scaled linearly from the measured batch to 32 when they differ; cache memory linearly to
1,024 images). Accuracy is not measured (random weights).

Each module's iteration is also held against a floor: its matmul FLOPs (forward and backward, counted by
``torch.utils.flop_counter``) over the device's measured fp32 matmul throughput. ``iter_s / floor_s`` says how far
an iteration is from what the hardware's matmul units allow; the rest is element-wise fake-quant traffic, kernel
launches and Python.

    python -m bench speed                                  # CPU, small budget (about 10 minutes on 2 cores)
    python -m bench speed --device cuda --models deit_small_patch16_224 --num-calib 64 --batch-size 32 --iters 20
    python -m bench speed --device cuda --models deit_small_patch16_224 --num-calib 64 --batch-size 32 \
        --iters 20 --no-cuda-graphs
    python -m bench speed --check-graphs                   # on a GPU: the same result with and without CUDA graphs

``--check-graphs`` quantizes each reference model twice on the GPU (W4A4, 256 of the bundle's images, 40
iterations per module, rounding hardened at half way so that each module is captured twice), with and without
CUDA graphs, and compares every parameter and buffer, the logits on the 5,000 validation images and Top-1.

Writes ``bench/results/speed.json`` (one entry per model, device and setting, resumable) and, with
``--check-graphs``, ``cuda_graphs.json``; ``python -m bench report`` renders them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, RESULT_PREFIX, load_results, machine_info, proc_status_mb, reset_peak_rss, save_results

PAPER_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "deit_tiny_patch16_224", "deit_small_patch16_224",
                "deit_base_patch16_224", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                "swin_base_patch4_window7_224")
PAPER_IMAGES, PAPER_ITERS, PAPER_BATCH = 1024, 3000, 32


def kind(stage_name: str) -> str:
    return "attention" if stage_name.endswith("attn") else "mlp" if stage_name.endswith("mlp") else "other"


def matmul_flops_per_s(device, n: int = 2048, repeats: int = 5) -> float:
    """The device's fp32 matmul throughput (no TF32), the best of ``repeats`` square ``n``-products."""
    import torch

    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def iteration_flops(engine, batch_size: int) -> int:
    """Matmul FLOPs of one reconstruction iteration of the current module: its forward and backward on a batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from adfq_lightning.modules import recording_scores

    module, cache = engine.current.module, engine.cache
    with FlopCounterMode(display=False) as counter, torch.enable_grad(), recording_scores(module):
        out, scores = cache.forward(module, cache.t_q[:batch_size])
        loss = out.pow(2).sum() + (0 if scores is None else scores.pow(2).sum())
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops()


def measure(spec: dict) -> dict:
    """One model, in this process."""
    import warnings

    import torch

    from adfq_lightning import ADFQConfig, prepare
    from adfq_lightning.models import RandomWeightsWarning, create_model
    from adfq_lightning.reconstruction import Reconstructor, make_optimizer

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_model(spec["model"]).to(device)
    images = torch.randn(spec["num_calib"], 3, 224, 224, generator=torch.Generator().manual_seed(0))
    config = ADFQConfig(w_bits=4, a_bits=4, iters=spec["iters"], batch_size=spec["batch_size"],
                        init_samples=min(256, spec["num_calib"]), cache_device=spec["cache_device"],
                        cuda_graphs=spec["cuda_graphs"], torch_compile=bool(spec.get("torch_compile")))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    matmul_rate = matmul_flops_per_s(device)
    reset_peak_rss()
    rss0 = proc_status_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    prepare(model, config)  # weight-grid search of every layer
    sync()
    weight_search_s = time.perf_counter() - start
    engine = Reconstructor(model, config, images.to(device), torch.arange(len(images)), len(images))
    optimizer = make_optimizer(model, config)
    modules = []
    while not engine.done:
        t0 = time.perf_counter()
        engine.prepare_stage()
        sync()
        prepare_s = time.perf_counter() - t0
        flops = iteration_flops(engine, config.batch_size)  # its gradients are zeroed by the first step
        times = []
        while not engine.stage_complete():
            t0 = time.perf_counter()
            engine.step(optimizer)
            sync()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stage = engine.finish_stage(optimizer)
        sync()
        steady = times[1:] or times  # the first iteration pays one-off allocations
        modules.append({"name": stage.name, "kind": kind(stage.name), "prepare_s": prepare_s,
                        "finish_s": time.perf_counter() - t0, "iter_s": statistics.median(steady),
                        "first_iter_s": times[0], "cache_mb": stage.stats["cache_mb"], "flops": flops,
                        "floor_s": flops / matmul_rate})
    total_s = time.perf_counter() - start
    hwm = proc_status_mb("VmHWM")
    result = dict(spec, weight_search_s=weight_search_s, total_s=total_s, modules=modules,
                  matmul_tflops=matmul_rate / 1e12,
                  peak_rss_mb=hwm, peak_rss_rise_mb=(hwm - rss0) if hwm and rss0 else None,
                  torch=torch.__version__)
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def quantized(model_name: str, graphs: bool, calib, val, args) -> dict:
    import torch

    from adfq_lightning import ADFQConfig, quantize
    from adfq_lightning.zoo import create_reference_model

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


def compare(model_name: str, calib, val, labels, args) -> dict:
    """One reference model quantized with and without CUDA graphs, the two compared."""
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy

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


def check_graphs(args, command: str) -> int:
    import torch

    from adfq_lightning.atomic import atomic_write
    from adfq_lightning.data import cifar10_eval_transform, load_bundle

    if not torch.cuda.is_available():
        print("--check-graphs needs a CUDA device", file=sys.stderr)
        return 2
    bundle = load_bundle()
    transform = cifar10_eval_transform()
    calib, val = transform(bundle["calib_images"][: args.num_calib]), transform(bundle["val_images"][:5000])
    data = {"command": command, "machine": machine_info("cuda"), "bits": 4, "num_calib": args.num_calib,
            "num_val": len(val), "iters": args.iters, "batch_size": args.batch_size, "runs": []}
    for name in ("vit_cifar", "deit_cifar", "swin_cifar"):
        data["runs"].append(compare(name, calib, val, bundle["val_labels"][:5000], args))
        print(json.dumps(data["runs"][-1]), flush=True)
        atomic_write(args.out / "cuda_graphs.json", (json.dumps(data, indent=1) + "\n").encode())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--models", nargs="+", default=list(PAPER_MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-device", default=None, help="where the activation cache lives (default: the device)")
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="launch every kernel of an iteration eagerly on a GPU (ADFQConfig.cuda_graphs=False)")
    p.add_argument("--torch-compile", action="store_true",
                   help="compile every reconstruction target (ADFQConfig.torch_compile=True)")
    p.add_argument("--check-graphs", action="store_true",
                   help="on a GPU: each reference model quantized with and without CUDA graphs, compared "
                        "(with --num-calib 256 --iters 40 --batch-size 32 unless given)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args._worker))), flush=True)
        return 0
    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "-m", "bench", "speed", *given])
    if args.check_graphs:
        for flag, value in (("--num-calib", 256), ("--iters", 40), ("--batch-size", 32)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
        return check_graphs(args, command)
    path = args.out / "speed.json"
    data = load_results(path)
    for model in args.models:
        spec = {"model": model, "device": args.device, "cache_device": args.cache_device,
                "num_calib": args.num_calib, "batch_size": args.batch_size, "iters": args.iters,
                "threads": args.threads, "cuda_graphs": args.cuda_graphs,
                "torch_compile": args.torch_compile}
        if any(all(r.get(k, False if k == "torch_compile" else None) == v for k, v in spec.items())
               for r in data["runs"]):
            continue
        print(f"{model} on {args.device} ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True,
                              text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if done.returncode or not lines:
            print(f"  FAILED:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        result = dict(json.loads(lines[-1][len(RESULT_PREFIX):]), command=command,
                      machine=machine_info(args.device))
        data["runs"].append(result)
        save_results(path, data)
        print(f"  run {result['total_s']:.0f} s", flush=True)
    print("python -m bench report renders the tables", flush=True)
    return 0


if __name__ == "__main__":  # the worker: python bench/speed.py --_worker '<spec json>'
    sys.exit(main())
