#!/usr/bin/env python
"""ADFQ-ViT post-training quantization benchmark on the reference CIFAR-10 models (issue 4, sections 4/5).

For each reference model it measures

* FP Top-1 / Top-5 on the bundle's validation images;
* Top-1 / Top-5 at WnAn (default W3A3, W4A4, W6A6) for the ``minmax`` and ``percentile`` baselines, ADFQ
  without reconstruction (``adfq_init``) and full ADFQ (``adfq``, with ASMO reconstruction);
* an ablation at W4A4: full ADFQ with PPOQ, SLQ, the attention-score KL term and QDrop switched off in turn;
* wall time of ``quantize()`` (calibration + reconstruction, nothing else) and its peak memory.

Every configuration runs in a fresh Python subprocess, so its peak resident memory is clean (Linux
``VmHWM``, additionally reset through ``/proc/self/clear_refs`` right before ``quantize()`` where the
kernel allows it); ``peak_mem_mb`` is that peak minus the resident size just before ``quantize()``.
Calibration always uses the bundle's calibration images (never validation images).

Results go to ``<out>/benchmark.json`` (rewritten atomically after every run, so an interrupted benchmark
keeps what it finished), ``<out>/benchmark.md`` and ``<out>/top1_vs_bits.png``. Re-running the same
command resumes: runs already in the JSON with the same settings (and the same model weights, by hash)
are skipped.

Examples::

    python bench/run_benchmark.py                                  # everything, default iters
    python bench/run_benchmark.py --models vit_cifar --iters 100   # one model
    python bench/run_benchmark.py --report-only                    # rebuild .md/.png from the JSON
    python bench/run_benchmark.py --dry-run                        # list the runs (and which are done)

This is a script, not a test; it is not collected by pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from adfq_lightning.io import atomic_write

REPO = Path(__file__).resolve().parent.parent
MODELS = ("vit_cifar", "deit_cifar", "swin_cifar")
METHODS = ("minmax", "percentile", "adfq_init", "adfq")
METHOD_LABELS = {
    "fp": "FP32",
    "minmax": "MinMax (per-tensor)",
    "percentile": "Percentile (per-tensor)",
    "adfq_init": "ADFQ w/o reconstruction",
    "adfq": "ADFQ (full)",
}
#: ablation name -> ADFQConfig changes applied to the full ``adfq`` preset.
ABLATIONS = {
    "no_ppoq": {"ppoq": False},
    "no_slq": {"slq": False},
    "no_attn_kl": {"attn_kl": False},
    "no_qdrop": {"qdrop_prob": 1.0},
    "no_log_softmax": {"log_softmax": False},  # extra, not in the default list
}
ABLATION_LABELS = {
    "none": "full ADFQ",
    "no_ppoq": "w/o PPOQ",
    "no_slq": "w/o SLQ",
    "no_attn_kl": "w/o attn-KL",
    "no_qdrop": "w/o QDrop",
    "no_log_softmax": "w/o log-sqrt2 softmax",
}
DEFAULT_ABLATIONS = ("no_ppoq", "no_slq", "no_attn_kl", "no_qdrop")
# Chosen so that all three models (51 runs) fit ~40 min on 2 uncontended CPU cores; see bench/README.md.
DEFAULT_ITERS = 100
DEFAULT_NUM_CALIB = 1024
DEFAULT_NUM_VAL = 5000
RESULT_PREFIX = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------------
# Small helpers (no torch import: the parent process stays light)
# ---------------------------------------------------------------------------------------------------------

def proc_status_mb(field: str) -> Optional[float]:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def weights_fingerprint(model: str, untrained: bool) -> str:
    """sha256 prefix of the shipped asset (results from other weights are not reused)."""
    if untrained:
        return "random-init"
    path = REPO / "adfq_lightning" / "assets" / f"{model}.pt"
    if not path.is_file():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bits_label(w: int, a: int) -> str:
    return f"W{w}A{a}"


# ---------------------------------------------------------------------------------------------------------
# Run specifications
# ---------------------------------------------------------------------------------------------------------

def make_spec(args, model: str, method: str, bits: Optional[int], ablation: str, fingerprint: str) -> dict:
    reconstruct = method == "adfq"
    return {
        "model": model,
        "method": method,
        "w_bits": bits,
        "a_bits": bits,
        "ablation": ablation,
        # reconstruction settings only matter for runs that reconstruct; 0 iters = no reconstruction
        "iters": args.iters if reconstruct else 0,
        "batch_size": args.batch_size if reconstruct else None,
        "num_calib": args.num_calib if method != "fp" else 0,
        "num_val": args.num_val,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "weights": fingerprint,
    }


KEY_FIELDS = ("model", "method", "w_bits", "a_bits", "ablation", "iters", "batch_size", "num_calib", "num_val",
              "seed", "threads", "device", "weights")


def spec_key(spec: dict) -> str:
    return json.dumps([spec.get(k) for k in KEY_FIELDS])


def plan_runs(args) -> list[dict]:
    """Every run, cheapest and most important first, so a partial benchmark still has complete tables:
    FP, then the calibration-only methods at all bits, then full ADFQ, then the ablation."""
    fps = {m: weights_fingerprint(m, args.untrained) for m in args.models}
    runs = [make_spec(args, m, "fp", None, "none", fps[m]) for m in args.models]
    for method in [m for m in args.methods if m != "adfq"]:
        for m in args.models:
            runs += [make_spec(args, m, method, b, "none", fps[m]) for b in args.bits]
    if "adfq" in args.methods:
        for m in args.models:
            runs += [make_spec(args, m, "adfq", b, "none", fps[m]) for b in args.bits]
    for m in args.models:
        if args.ablations:  # the full-ADFQ reference of the ablation (a duplicate of a main run is dropped below)
            runs.append(make_spec(args, m, "adfq", args.ablation_bits, "none", fps[m]))
            runs += [make_spec(args, m, "adfq", args.ablation_bits, a, fps[m]) for a in args.ablations]
    unique, seen = [], set()
    for r in runs:
        if spec_key(r) not in seen:
            seen.add(spec_key(r))
            unique.append(r)
    return unique


# ---------------------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process
# ---------------------------------------------------------------------------------------------------------

def worker(spec: dict) -> dict:
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    import timm
    from torchmetrics.classification import MulticlassAccuracy

    from adfq_lightning.api import quantize
    from adfq_lightning.config import ADFQConfig
    from adfq_lightning.data import cifar10_eval_transform, load_bundle
    from adfq_lightning.zoo import NUM_CLASSES, create_reference_model

    device = torch.device(spec["device"])
    bundle = load_bundle()
    untrained = spec["weights"] == "random-init"
    model = create_reference_model(spec["model"], pretrained=not untrained).to(device)
    # the assets may be rewritten while training runs: record the weights actually loaded
    loaded = weights_fingerprint(spec["model"], untrained)
    transform = cifar10_eval_transform(timm.data.resolve_data_config(model=model))
    val_images = bundle["val_images"][: spec["num_val"]]
    val_labels = bundle["val_labels"][: spec["num_val"]]
    # The bundle's calibration images come from the training split; any prefix is class-balanced.
    calib_images = transform(bundle["calib_images"][: spec["num_calib"]]) if spec["num_calib"] else None
    del bundle

    result = dict(spec)
    if loaded != spec["weights"]:
        print(f"warning: {spec['model']} weights changed since planning ({spec['weights']} -> {loaded}); "
              "recording the loaded ones", file=sys.stderr)
        result["weights"] = loaded
    result.update(calib_seconds=0.0, calib_cpu_seconds=0.0, peak_mem_mb=0.0, peak_rss_mb=None,
                  rss_before_mb=None, mem_method=None)
    if spec["method"] != "fp":
        ablation = ABLATIONS.get(spec["ablation"], {})
        config = ADFQConfig.preset(spec["method"], w_bits=spec["w_bits"], a_bits=spec["a_bits"],
                                   seed=spec["seed"], **({"iters": spec["iters"], "batch_size": spec["batch_size"]}
                                                         if spec["method"] == "adfq" else {}), **ablation)
        result["config"] = {k: v for k, v in config.to_dict().items() if k != "overrides"}
        calib_images = calib_images.to(device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        reset = reset_peak_rss()
        rss0 = proc_status_mb("VmRSS")
        hwm0 = proc_status_mb("VmHWM")
        cpu0, t0 = time.process_time(), time.perf_counter()
        quantize(model, calib_images, config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["calib_seconds"] = time.perf_counter() - t0
        result["calib_cpu_seconds"] = time.process_time() - cpu0
        hwm = proc_status_mb("VmHWM")
        if hwm is not None and rss0 is not None:
            result["peak_mem_mb"] = max(0.0, hwm - rss0)
            result["peak_rss_mb"] = hwm
            result["rss_before_mb"] = rss0
            # without a reset, a peak reached while loading (before quantize) would hide a smaller one
            result["mem_method"] = "VmHWM after clear_refs reset" if reset else (
                "VmHWM (fresh process, no reset" + (", pre-quantize peak is higher: lower bound)" if hwm <= hwm0 else ")"))
        if device.type == "cuda":
            result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        del calib_images
        gc.collect()

    model.eval()
    top1 = MulticlassAccuracy(num_classes=NUM_CLASSES, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes=NUM_CLASSES, top_k=5, average="micro").to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(val_images), spec["eval_batch_size"]):
            x = transform(val_images[i : i + spec["eval_batch_size"]]).to(device)
            y = val_labels[i : i + spec["eval_batch_size"]].to(device)
            logits = model(x)
            top1.update(logits, y)
            top5.update(logits, y)
    result["eval_seconds"] = time.perf_counter() - t0
    result["top1"] = float(top1.compute()) * 100
    result["top5"] = float(top5.compute()) * 100
    result["loadavg_end"] = os.getloadavg()[0]
    result["torch"] = torch.__version__
    return result


def run_in_subprocess(spec: dict, timeout: Optional[float]) -> dict:
    """Run one configuration in a fresh interpreter; its last BENCH_RESULT line is the result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if spec.get("omp_wait_policy", "default") != "default":
        # libgomp's default (spin while waiting) makes every parallel region stall when another process holds
        # a core: measured 8-13x slower quantize() on a shared 2-core machine; PASSIVE sleeps instead.
        env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"].upper()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s")
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker exited with code {proc.returncode}:\n{out[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ---------------------------------------------------------------------------------------------------------
# Results file, Markdown, plot
# ---------------------------------------------------------------------------------------------------------

def load_results(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        data.setdefault("runs", [])
        data.setdefault("meta", {})
        return data
    return {"meta": {}, "runs": []}


def machine_info(args) -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "cpu_model": cpu_model(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": args.device,
        "omp_wait_policy": args.omp_wait_policy if args.omp_wait_policy != "default"
        else os.environ.get("OMP_WAIT_POLICY", "unset"),
        "loadavg_at_start": os.getloadavg()[0],
    }
    for pkg in ("timm", "lightning", "torchmetrics"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # pragma: no cover - informative only
            pass
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def fmt(v, digits=2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def select(runs: list[dict], **kw) -> list[dict]:
    return [r for r in runs if all(r.get(k) == v for k, v in kw.items())]


def latest(runs: list[dict], **kw) -> Optional[dict]:
    found = select(runs, **kw)
    return found[-1] if found else None


def current_runs(data: dict, args) -> list[dict]:
    """The results matching this invocation's settings (one per planned run, in plan order)."""
    by_key = {spec_key(r): r for r in data["runs"]}
    return [by_key[spec_key(s)] for s in plan_runs(args) if spec_key(s) in by_key]


def render_markdown(runs: list[dict], data: dict, args) -> str:
    meta = data["meta"]
    machine = meta.get("machine", {})
    lines = ["# ADFQ-ViT PTQ benchmark (reference CIFAR-10 models)", ""]
    lines += ["Produced by:", "", "```", meta.get("command", ""), "```", ""]
    if len(meta.get("commands", [])) > 1:
        lines += ["Results were accumulated (resumed) over these invocations:", ""]
        lines += [f"- `{c}`" for c in meta["commands"]] + [""]
    lines += [
        f"Machine: {machine.get('cpu_count')} CPUs ({machine.get('cpus_available')} available to the process, "
        f"{machine.get('cpu_model')}), torch {machine.get('torch')} with {machine.get('torch_threads')} threads, "
        f"timm {machine.get('timm')}, lightning {machine.get('lightning')}, torchmetrics {machine.get('torchmetrics')}, "
        f"Python {machine.get('python')}, device `{machine.get('device')}`"
        + (f" ({machine['gpu']})" if machine.get("gpu") else "")
        + f", OMP_WAIT_POLICY={machine.get('omp_wait_policy')}; 1-min load average at start "
        f"{fmt(machine.get('loadavg_at_start'), 1)}.",
        "",
        f"Calibration: the bundle's first {args.num_calib} calibration images (training split); evaluation: the "
        f"first {args.num_val} of the bundle's 5,000 validation images. Reconstruction (`adfq` rows): "
        f"**{args.iters} iterations per module**, batch {args.batch_size} (the paper uses 3,000 iterations; "
        "cut for the CPU budget). Patch embedding and classifier stay at 8 bits (library default). "
        "Top-1/Top-5 in %.",
        "",
    ]
    models = list(dict.fromkeys(r["model"] for r in runs))
    bits = [b for b in args.bits]
    for model in models:
        mr = select(runs, model=model)
        fp = latest(mr, method="fp")
        fp_txt = f"{fp['top1']:.2f}" if fp else "–"
        lines += [f"## {model}", ""]
        if fp:
            lines += [f"FP32: Top-1 {fp['top1']:.2f}, Top-5 {fp['top5']:.2f} (weights `{fp['weights']}`).", ""]
        lines += ["Top-1 (%) (Top-5 in parentheses)", ""]
        lines += ["| method | " + " | ".join(bits_label(b, b) for b in bits) + " | FP |",
                  "|---|" + "---:|" * (len(bits) + 1)]
        for method in [m for m in args.methods]:
            cells = []
            for b in bits:
                r = latest(mr, method=method, w_bits=b, ablation="none")
                cells.append(f"{r['top1']:.2f} ({r['top5']:.2f})" if r else "–")
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + f" | {fp_txt} |")
        lines.append("")

    if args.ablations:
        ab = args.ablation_bits
        cols = ["none", *args.ablations]
        lines += [f"## Ablation at {bits_label(ab, ab)} (full ADFQ with one component off; Top-1 %, Δ vs full)", ""]
        lines += ["| model | " + " | ".join(ABLATION_LABELS[c] for c in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for model in models:
            full = latest(runs, model=model, method="adfq", w_bits=ab, ablation="none")
            cells = []
            for c in cols:
                r = latest(runs, model=model, method="adfq", w_bits=ab, ablation=c)
                if r is None:
                    cells.append("–")
                elif c == "none" or full is None:
                    cells.append(f"{r['top1']:.2f}")
                else:
                    cells.append(f"{r['top1']:.2f} ({r['top1'] - full['top1']:+.2f})")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## Calibration time and memory (every run)", "",
              "`calib s` is the wall time of `quantize()` only (calibration + reconstruction); `cpu s` its process "
              "CPU time; `peak MB` the rise of the process's peak resident memory (VmHWM) during `quantize()` "
              "over its resident size just before, each run in a fresh process; `load` the 1-min load average "
              "when the run ended (above the thread count means the timings were inflated by other processes).",
              "",
              "| model | method | bits | ablation | iters | Top-1 | Top-5 | calib s | cpu s | peak MB | eval s | load |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        bl = bits_label(r["w_bits"], r["a_bits"]) if r["w_bits"] else "FP"
        lines.append(
            f"| {r['model']} | {r['method']} | {bl} | {r['ablation']} | {r['iters']} | {r['top1']:.2f} | "
            f"{r['top5']:.2f} | {fmt(r['calib_seconds'], 1)} | {fmt(r.get('calib_cpu_seconds'), 1)} | "
            f"{fmt(r['peak_mem_mb'], 0)} | {fmt(r.get('eval_seconds'), 1)} | {fmt(r.get('loadavg_end'), 1)} |")
    total_calib = sum(r["calib_seconds"] for r in runs)
    total_wall = sum(r.get("run_seconds", 0.0) for r in runs)
    lines += ["", f"Total `quantize()` wall time: {total_calib / 60:.1f} min; total wall time of these runs "
              f"(process start, loading, calibration and evaluation): {total_wall / 60:.1f} min.", ""]
    return "\n".join(lines)


def render_plot(runs: list[dict], args, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    models = list(dict.fromkeys(r["model"] for r in runs))
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(max(5 * len(models), 7), 4.5), squeeze=False)
    markers = {"minmax": "v", "percentile": "^", "adfq_init": "s", "adfq": "o"}
    for ax, model in zip(axes[0], models):
        mr = select(runs, model=model)
        for method in args.methods:
            pts = sorted((r["w_bits"], r["top1"]) for r in mr if r["method"] == method and r["ablation"] == "none")
            if pts:
                ax.plot(*zip(*pts), marker=markers.get(method, "o"), label=METHOD_LABELS[method])
        fp = latest(mr, method="fp")
        if fp:
            ax.axhline(fp["top1"], color="k", linestyle="--", linewidth=1, label=f"FP32 ({fp['top1']:.1f})")
        ax.set_title(model)
        ax.set_xlabel("bits (W = A)")
        ax.set_xticks(list(args.bits))
        ax.set_xticklabels([bits_label(b, b) for b in args.bits])
        ax.set_ylabel("Top-1 (%)")
        values = [r["top1"] for r in mr]
        ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Top-1 vs bits, CIFAR-10 ({args.num_val} val images)\nfull ADFQ: {args.iters} reconstruction "
                 "iters/module", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_reports(data: dict, args) -> list[dict]:
    runs = current_runs(data, args)
    out = Path(args.out)
    atomic_write(out / "benchmark.md", render_markdown(runs, data, args).encode())
    render_plot(runs, args, out / "top1_vs_bits.png")
    return runs


def print_summary(runs: list[dict], args) -> None:
    print("\n=== Summary (Top-1 %) ===")
    print(f"iters per module for full ADFQ: {args.iters}; calib images {args.num_calib}; val images {args.num_val}")
    for model in dict.fromkeys(r["model"] for r in runs):
        mr = select(runs, model=model)
        fp = latest(mr, method="fp")
        print(f"\n{model}: FP Top-1 {fmt(fp['top1'] if fp else None)}  Top-5 {fmt(fp['top5'] if fp else None)}")
        print(f"  {'method':<26}" + "".join(f"{bits_label(b, b):>9}" for b in args.bits) + f"{'calib s':>10}")
        for method in args.methods:
            rs = [latest(mr, method=method, w_bits=b, ablation="none") for b in args.bits]
            secs = [r["calib_seconds"] for r in rs if r]
            print(f"  {METHOD_LABELS[method]:<26}" + "".join(f"{fmt(r['top1'] if r else None):>9}" for r in rs)
                  + f"{fmt(sum(secs) / len(secs) if secs else None, 1):>10}")
        if args.ablations:
            ab = [(a, latest(mr, method="adfq", w_bits=args.ablation_bits, ablation=a)) for a in ("none", *args.ablations)]
            print(f"  ablation {bits_label(args.ablation_bits, args.ablation_bits)}: "
                  + ", ".join(f"{ABLATION_LABELS[a]} {fmt(r['top1'] if r else None)}" for a, r in ab))


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4, 6], help="WnAn bit-widths (weights = activations)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ablations", nargs="*", default=list(DEFAULT_ABLATIONS), choices=list(ABLATIONS),
                   help="components switched off in turn (full ADFQ otherwise); pass --ablations with no names to skip the ablation")
    p.add_argument("--ablation-bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                   help="ASMO reconstruction iterations per module (paper: 3000)")
    p.add_argument("--batch-size", type=int, default=32, help="reconstruction batch size")
    p.add_argument("--num-calib", type=int, default=DEFAULT_NUM_CALIB, help="calibration images (bundle: 1024)")
    p.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL, help="validation images (bundle: 5000)")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "default"],
                   help="OMP_WAIT_POLICY of the runs; passive keeps timings sane when other processes share the "
                        "cores (default = leave the environment alone)")
    p.add_argument("--device", default="cpu", help="cpu (the benchmarked setting) or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds before one run is killed")
    p.add_argument("--force", action="store_true", help="re-run configurations already in the JSON")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done, run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild benchmark.md and the plot from the JSON")
    p.add_argument("--untrained", action="store_true",
                   help="random-init models (timing/smoke tests only; recorded as weights=random-init)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for b in [*args.bits, args.ablation_bits]:
        if not 2 <= b <= 8:
            p.error(f"bits must be 2..8, got {b}")
    if args.num_calib < 1 or not 1 <= args.num_val <= 5000:
        p.error("--num-calib must be >= 1 and --num-val in 1..5000")
    args.bits = sorted(set(args.bits))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        print(RESULT_PREFIX + json.dumps(worker(spec)), flush=True)
        return 0

    out = Path(args.out)
    json_path = out / "benchmark.json"
    data = load_results(json_path)
    command = shlex.join(["python", os.path.relpath(__file__, Path.cwd()), *(argv if argv is not None else sys.argv[1:])])
    plan = plan_runs(args)
    done = {spec_key(r) for r in data["runs"]}
    todo = [s for s in plan if args.force or spec_key(s) not in done]

    print(f"ADFQ benchmark: {len(plan)} runs planned, {len(plan) - len(todo)} already in {json_path}, "
          f"{len(todo)} to run. Full-ADFQ reconstruction iters per module: {args.iters} "
          f"(batch {args.batch_size}); {args.num_calib} calib / {args.num_val} val images; "
          f"{args.threads} torch threads on {args.device}.", flush=True)
    for m in args.models:
        fp = weights_fingerprint(m, args.untrained)
        if fp == "missing":
            print(f"error: no weights for {m} at adfq_lightning/assets/{m}.pt", file=sys.stderr)
            return 2
    if args.dry_run:
        for s in plan:
            state = "done" if spec_key(s) in done else "todo"
            bl = bits_label(s["w_bits"], s["a_bits"]) if s["w_bits"] else "FP"
            print(f"  [{state}] {s['model']:<11} {s['method']:<10} {bl:<5} {s['ablation']:<11} iters={s['iters']}")
        return 0

    if not args.report_only:
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"note: 1-min load average is {load:.1f} on {os.cpu_count()} CPUs: other processes are running, "
                  "timings will be inflated (each run records the load when it ended).", flush=True)
        data["meta"]["command"] = command
        data["meta"].setdefault("commands", [])
        if command not in data["meta"]["commands"]:
            data["meta"]["commands"].append(command)
        data["meta"]["machine"] = machine_info(args)
        data["meta"]["iters"] = args.iters
        start = time.perf_counter()
        for i, spec in enumerate(todo, 1):
            bl = bits_label(spec["w_bits"], spec["a_bits"]) if spec["w_bits"] else "FP"
            print(f"[{i}/{len(todo)}] {spec['model']} {spec['method']} {bl} ablation={spec['ablation']} "
                  f"iters={spec['iters']} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
            t0 = time.perf_counter()
            try:
                result = run_in_subprocess({**spec, "eval_batch_size": args.eval_batch_size,
                                            "omp_wait_policy": args.omp_wait_policy}, args.run_timeout)
            except RuntimeError as err:
                print(f"    FAILED: {err}", file=sys.stderr, flush=True)
                continue
            result["run_seconds"] = time.perf_counter() - t0
            result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            result["key"] = spec_key(spec)
            data["runs"] = [r for r in data["runs"] if spec_key(r) != spec_key(spec)] + [result]
            atomic_write(json_path, (json.dumps(data, indent=1) + "\n").encode())
            print(f"    top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  calib {result['calib_seconds']:.1f} s "
                  f"(cpu {result['calib_cpu_seconds']:.1f} s)  peak +{result['peak_mem_mb']:.0f} MB  "
                  f"eval {result['eval_seconds']:.1f} s  run {result['run_seconds']:.1f} s  "
                  f"[elapsed {(time.perf_counter() - start) / 60:.1f} min]", flush=True)
            write_reports(data, args)
    if not data["runs"]:
        print("no results yet", file=sys.stderr)
        return 1
    data["meta"].setdefault("machine", machine_info(args))
    data["meta"].setdefault("command", command)
    runs = write_reports(data, args)
    print_summary(runs, args)
    print(f"\nwrote {json_path}, {out / 'benchmark.md'}, {out / 'top1_vs_bits.png'}")
    missing = len(plan) - len(runs)
    if missing:
        print(f"{missing} planned run(s) have no result (failed or not yet run); re-run the same command to resume.")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
