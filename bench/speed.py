#!/usr/bin/env python
"""Speed and memory of ADFQ calibration at real sizes: the eight paper models at 224 px, random weights.

For each model it runs the engine stage by stage on random images and records, per module: the seconds of
one reconstruction iteration, the seconds of preparing it (cache, calibration, held-out error) and its
activation-cache size; and for the run: peak memory. It then projects the paper's budget (1,024 images,
3,000 iterations per module, batch 32) from those measurements:

    projected = sum over modules of [prepare_s * 1024 / num_calib + 3000 * iter_s * 32 / batch_size]

(iteration time scaled linearly from the measured batch to 32 when they differ; cache memory linearly to
1,024 images). Accuracy is not measured (random weights).

    python bench/speed.py                                  # CPU, small budget (minutes on 2 cores)
    python bench/speed.py --device cuda --num-calib 64 --batch-size 32 --iters 20
    python bench/speed.py --device cuda --num-calib 64 --batch-size 32 --iters 20 --no-cuda-graphs
    python bench/speed.py --report-only

Writes ``bench/results/speed.json`` (one entry per model and device, resumable) and ``speed.md``.
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

from adfq_lightning.io import atomic_write

PAPER_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "deit_tiny_patch16_224", "deit_small_patch16_224",
                "deit_base_patch16_224", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                "swin_base_patch4_window7_224")
PAPER_IMAGES, PAPER_ITERS, PAPER_BATCH = 1024, 3000, 32


def kind(stage_name: str) -> str:
    return "attention" if stage_name.endswith("attn") else "mlp" if stage_name.endswith("mlp") else "other"


def measure(spec: dict) -> dict:
    """One model, in this process."""
    import warnings

    import torch

    from adfq_lightning import ADFQConfig, prepare
    from adfq_lightning.models import RandomWeightsWarning, create_model
    from adfq_lightning.reconstruction import Reconstructor
    from adfq_lightning.reconstruction.engine import make_optimizer

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_model(spec["model"]).to(device)
    images = torch.randn(spec["num_calib"], 3, 224, 224, generator=torch.Generator().manual_seed(0))
    config = ADFQConfig(w_bits=4, a_bits=4, iters=spec["iters"], batch_size=spec["batch_size"],
                        init_samples=min(256, spec["num_calib"]), cache_device=spec["cache_device"],
                        cuda_graphs=spec["cuda_graphs"])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

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
                        "cache_mb": stage.stats["cache_mb"]})
    total_s = time.perf_counter() - start
    hwm = proc_status_mb("VmHWM")
    result = dict(spec, weight_search_s=weight_search_s, total_s=total_s, modules=modules,
                  peak_rss_mb=hwm, peak_rss_rise_mb=(hwm - rss0) if hwm and rss0 else None,
                  torch=torch.__version__)
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def projection(r: dict) -> dict:
    """The paper's budget from the measured per-module costs (see the module docstring)."""
    scale_images, scale_batch = PAPER_IMAGES / r["num_calib"], PAPER_BATCH / r["batch_size"]
    prepare = sum(m["prepare_s"] + m["finish_s"] for m in r["modules"]) * scale_images
    iterate = sum(m["iter_s"] for m in r["modules"]) * PAPER_ITERS * scale_batch
    per_kind = {}
    for k in ("attention", "mlp", "other"):
        its = [m["iter_s"] for m in r["modules"] if m["kind"] == k]
        per_kind[k] = statistics.mean(its) if its else None
    return {"hours": (prepare + iterate + r["weight_search_s"]) / 3600, "iterate_hours": iterate / 3600,
            "per_kind_iter_s": per_kind, "max_cache_mb_1024": max(m["cache_mb"] for m in r["modules"]) * scale_images}


def render(data: dict) -> str:
    lines = ["# Calibration speed at real sizes (random weights, 224 px)", "", "Produced by:", ""]
    lines += [f"- `{c}`" for c in data["meta"].get("commands", [])] + [""]
    m = data["meta"].get("machine", {})
    lines += [f"Machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model')}), torch {m.get('torch')}"
              + (f", GPU {m['gpu']}" if m.get("gpu") else "") + ".", ""]
    lines += ["Seconds per reconstruction iteration (median, per module kind, at the measured batch), the "
              "largest activation cache of one module (measured, and scaled to 1,024 images), peak memory, and the "
              "projected time of the paper's budget (1,024 images, 3,000 iterations per module, batch 32). The "
              "projection scales the measured per-iteration time linearly to batch 32 and the per-module "
              "preparation linearly to 1,024 images: an estimate, not a run. *run* is the measured wall time of the "
              "whole calibration at the table's images, batch and iterations (the paper's budget where they are "
              "1,024 / 32 / 3,000).", ""]
    lines += ["| model | device | images / batch / iters | s/iter attention | s/iter MLP | s/iter other | weight search s | "
              "max cache MB (measured / at 1,024) | peak memory MB | projected paper budget | run |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["runs"]:
        p = projection(r)
        k = p["per_kind_iter_s"]
        fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        peak = r.get("peak_gpu_mb") or r.get("peak_rss_mb")
        label = "GPU " + r["gpu"] if r.get("gpu") else "CPU"
        graphs = ", CUDA graphs" if r.get("gpu") and r.get("cuda_graphs") else ""
        lines.append(f"| {r['model']} | {label} ({r['threads']} threads{graphs}) | {r['num_calib']} / "
                     f"{r['batch_size']} / {r['iters']} | {fmt(k['attention'])} | {fmt(k['mlp'])} | {fmt(k['other'])} | "
                     f"{r['weight_search_s']:.1f} | {max(x['cache_mb'] for x in r['modules']):.0f} / "
                     f"{p['max_cache_mb_1024']:.0f} | {peak:.0f} | {p['hours']:.2f} h | {r['total_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(PAPER_MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-device", default=None, help="where the activation cache lives (default: the device)")
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="launch every kernel of an iteration eagerly on a GPU (ADFQConfig.cuda_graphs=False)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args._worker))), flush=True)
        return 0
    path = args.out / "speed.json"
    data = load_results(path)
    if not args.report_only:
        command = shlex.join(["python", "bench/speed.py", *(argv if argv is not None else sys.argv[1:])])
        data["meta"].setdefault("commands", [])
        if command not in data["meta"]["commands"]:
            data["meta"]["commands"].append(command)
        data["meta"]["machine"] = machine_info(args.device)
        for model in args.models:
            spec = {"model": model, "device": args.device, "cache_device": args.cache_device,
                    "num_calib": args.num_calib, "batch_size": args.batch_size, "iters": args.iters,
                    "threads": args.threads, "cuda_graphs": args.cuda_graphs}
            if any(all(r.get(k) == v for k, v in spec.items()) for r in data["runs"]):
                continue
            print(f"{model} on {args.device} ...", flush=True)
            done = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
            if done.returncode or not lines:
                print(f"  FAILED:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(lines[-1][len(RESULT_PREFIX):])
            data["runs"].append(result)
            save_results(path, data)
            print(f"  projected paper budget {projection(result)['hours']:.1f} h, run {result['total_s']:.0f} s",
                  flush=True)
    atomic_write(args.out / "speed.md", render(data).encode())
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
