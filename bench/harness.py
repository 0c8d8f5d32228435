"""What the benchmark commands share: one quantization run per fresh process, a resumable results file.

A *spec* is a plain dict naming one run: model, preset, bits, config changes, calibration seed, budget.
``run_specs`` runs the specs that are not yet in the results file, ``jobs`` processes at a time, and
rewrites the file atomically after each run, so an interrupted benchmark resumes where it stopped.

Calibration images are drawn from the 45,000-image training part of the CIFAR-10 archive with the
spec's ``seed`` (a different class-balanced subset per seed); accuracy is measured on the fixed
5,000-image validation split, the images the shipped bundle holds. The reconstruction seed is the same
``seed``, so seeds vary both. A spec with ``unseen`` is also scored on the training part's images that no
calibration seed in ``UNSEEN_SEEDS`` draws (35,746 at 1,024 images a seed): seven times the validation images,
for differences of tenths.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a source checkout without installing

RESULT_PREFIX = "BENCH_RESULT "
#: Fields of a spec that identify a run (results with the same values are reused). The device is not one: a
#: cell and seed done on a GPU machine and merged in is not run again on the CPU, nor counted twice.
KEY_FIELDS = ("model", "preset", "w_bits", "a_bits", "changes", "tag", "iters", "batch_size", "num_calib", "num_val",
              "seed", "threads", "weights")
#: the calibration seeds, at 1,024 images each, whose images the ``unseen`` scoring set leaves out: a fixed set,
#: whatever a spec's own ``num_calib``
UNSEEN_SEEDS, UNSEEN_NUM_CALIB = range(10), 1024


def spec_key(spec: dict) -> str:
    return json.dumps([spec.get(k) for k in KEY_FIELDS], sort_keys=True)


def weights_fingerprint(model: str) -> str:
    """sha256 prefix of the shipped weights a reference model (or its stress variant) is built from."""
    import hashlib

    base = model.removesuffix("_outliers")
    path = REPO / "adfq_lightning" / "assets" / f"{base}.pt"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def make_spec(model: str, preset: str, bits: Optional[int] = None, *, seed: int = 0, iters: int = 0,
              changes: Optional[dict] = None, tag: str = "", batch_size: int = 32, num_calib: int = 1024,
              num_val: int = 5000, threads: int = 1, device: str = "cpu", unseen: bool = False) -> dict:
    """One run; ``iters``/``batch_size`` only count for presets that reconstruct (stored as 0/None otherwise).
    ``unseen`` adds the scoring on the unseen training images; like the device, it does not name another run."""
    changes = dict(changes or {})
    reconstructs = preset == "adfq" and changes.get("reconstruct", True)
    return {"model": model, "preset": preset, "w_bits": bits, "a_bits": bits, "changes": changes, "tag": tag,
            "iters": iters if reconstructs else 0, "batch_size": batch_size if reconstructs else None,
            "num_calib": num_calib if preset != "fp" else 0, "num_val": num_val, "seed": seed if preset != "fp" else 0,
            "threads": threads, "device": device, "weights": weights_fingerprint(model), "unseen": unseen}


# -- measurement helpers (no torch import: the parent process stays light) -------------------------------------

def proc_status_mb(field: str) -> Optional[float]:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
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


def machine_info(device: str = "cpu") -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu_count": os.cpu_count(), "cpu_model": cpu, "torch": torch.__version__}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- the worker: one spec, in its own process --------------------------------------------------------------------

def calibration_and_scoring(spec: dict) -> tuple:
    """The spec's calibration images, and its scoring sets as {name: (images, labels)}: ``val``, and ``unseen``
    where the spec asks for it (all uint8)."""
    import torch

    from adfq_lightning.data import DEFAULT_ARCHIVE, calibration_indices, decode_image_folder, split_indices

    data = decode_image_folder(DEFAULT_ARCHIVE)
    train_idx, val_idx = split_indices(data.labels)
    num_calib, num_val = spec["num_calib"], spec["num_val"]
    calib = calibration_indices(data.labels, num_calib, spec["seed"], candidates=train_idx) if num_calib \
        else train_idx[:0]
    sets = {"val": (data.images[val_idx[:num_val]], data.labels[val_idx[:num_val]])}
    if spec.get("unseen"):
        drawn = torch.cat([calibration_indices(data.labels, UNSEEN_NUM_CALIB, s, candidates=train_idx)
                           for s in UNSEEN_SEEDS])
        unseen = train_idx[~torch.isin(train_idx, drawn)]
        sets["unseen"] = data.images[unseen], data.labels[unseen]
    return data.images[calib], sets


def kl_to_fp(logits, fp_logits) -> float:
    """KL(FP32 || quantized) of two models' logits on the same images, mean over images (nats)."""
    import torch

    return float(torch.nn.functional.kl_div(logits.log_softmax(1), fp_logits.log_softmax(1), log_target=True,
                                            reduction="batchmean"))


def run_one(spec: dict) -> dict:
    import gc

    import timm.data
    import torch
    from torchmetrics.classification import MulticlassAccuracy

    from adfq_lightning import ADFQConfig, BitBudget, allocate_bits, prepare
    from adfq_lightning.data import cifar10_eval_transform
    from adfq_lightning.reconstruction import Reconstructor
    from adfq_lightning.zoo import create_reference_model

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    calib_u8, scoring = calibration_and_scoring(spec)
    model = create_reference_model(spec["model"], pretrained=True).to(device)
    transform = cifar10_eval_transform(timm.data.resolve_data_config(model=model))
    result = dict(spec, calib_seconds=0.0, peak_mem_mb=0.0)

    @torch.no_grad()
    def logits_of(images_u8) -> torch.Tensor:
        return torch.cat([model(transform(images_u8[i : i + 500]).to(device)) for i in range(0, len(images_u8), 500)])

    fp_logits = None
    if spec["preset"] != "fp":
        fp_logits = logits_of(scoring["val"][0])
        extra = {"iters": spec["iters"], "batch_size": spec["batch_size"]} if spec["iters"] else {}
        config = ADFQConfig.preset(spec["preset"], w_bits=spec["w_bits"], a_bits=spec["a_bits"], seed=spec["seed"],
                                   **extra, **spec["changes"])
        images = transform(calib_u8).to(device)
        gc.collect()
        reset_peak_rss()
        rss0 = proc_status_mb("VmRSS")
        t0 = time.perf_counter()
        if config.bit_budget is not None:  # mixed precision: the widths first, then calibration as usual
            allocated = allocate_bits(model.eval(), images, BitBudget(**config.bit_budget), config.replace(bit_budget=None))
            config = config.replace(overrides={**config.overrides, **allocated}, bit_budget=None)
            result["allocated"] = allocated
            result["allocation_seconds"] = time.perf_counter() - t0
        prepare(model.eval(), config)
        engine = Reconstructor(model, config, images, torch.arange(len(images)), len(images))
        engine.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["calib_seconds"] = time.perf_counter() - t0
        hwm = proc_status_mb("VmHWM")
        result["peak_mem_mb"] = max(0.0, hwm - rss0) if hwm is not None and rss0 is not None else None
        result.update(summarize_modules([s.stats for s in engine.stages]))
        del images, engine
    logits, labels = logits_of(scoring["val"][0]), scoring["val"][1].to(device)
    top1 = MulticlassAccuracy(num_classes=10, top_k=1, average="micro").to(device)(logits, labels)
    top5 = MulticlassAccuracy(num_classes=10, top_k=5, average="micro").to(device)(logits, labels)
    if fp_logits is not None:  # how far from the float model, beyond the labels: Top-1 alone is coarse at 6-8 bits
        result["fp_agreement"] = float((logits.argmax(1) == fp_logits.argmax(1)).float().mean()) * 100
        result["kl_to_fp"] = kl_to_fp(logits, fp_logits)
    if "unseen" in scoring:
        images_u8, unseen_labels = scoring["unseen"]
        t0 = time.perf_counter()
        correct = logits_of(images_u8).argmax(1).cpu() == unseen_labels
        result.update(unseen_top1=float(correct.float().mean()) * 100, unseen_images=len(unseen_labels),
                      unseen_seconds=time.perf_counter() - t0)
    result.update(top1=float(top1) * 100, top5=float(top5) * 100, loadavg_end=os.getloadavg()[0],
                  machine=machine_info(spec["device"]))
    return result


def run_in_subprocess(spec: dict, timeout: Optional[float] = None) -> dict:
    """Run one spec in a fresh interpreter (clean peak memory, no state shared between runs)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# -- the results file ---------------------------------------------------------------------------------------------

def load_results(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        data.setdefault("runs", [])
        data.setdefault("meta", {})
        return data
    return {"meta": {}, "runs": []}


def save_results(path: Path, data: dict) -> None:
    """One run per line: the file stays small and diffs run by run."""
    from adfq_lightning.atomic import atomic_write

    head = {k: v for k, v in data.items() if k != "runs"}
    lines = [json.dumps(r, sort_keys=True) for r in data["runs"]]
    text = json.dumps(head)[:-1] + (', ' if head else '') + '"runs": [\n' + ",\n".join(lines) + "\n]}\n"
    atomic_write(path, text.encode())


def add_result(path: Path, result: dict) -> dict:
    """Add one run to the results file (in place of a record of the same run: one scored again on more images)
    and return its data, re-read under a lock: two benchmark commands may write the same file."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_results(path)
        same = [i for i, r in enumerate(data["runs"]) if spec_key(r) == spec_key(result)]
        if same:  # in its place: the tables take the first record of a cell
            data["runs"][same[0]] = result
        else:
            data["runs"].append(result)
        save_results(path, data)
    return data


def merge_results(data: dict, others: list[dict]) -> int:
    """Add to ``data`` the runs of ``others`` it lacks (made on other machines); return how many."""
    done = {spec_key(r) for r in data["runs"]}
    added = 0
    for other in others:
        new = [r for r in other["runs"] if spec_key(r) not in done]
        done.update(spec_key(r) for r in new)
        if new:
            data["runs"] += new
            added += len(new)
    return added


def select(runs: list[dict], **fields) -> list[dict]:
    return [r for r in runs if all(r.get(k) == v for k, v in fields.items())]


def summarize_modules(modules: list[dict]) -> dict:
    """What a run's per-module records say, in a few numbers: the held-out module error after reconstruction
    over before it (geometric mean over the reconstructed modules: what reconstruction optimises, on images its
    updates did not see), and how many modules bias correction and the safeguard changed."""
    rec = [m for m in modules if "reconstructed_error" in m]
    out = {"modules": len(modules), "modules_bias_corrected": sum(1 for m in modules if m.get("bias_corrected")),
           "modules_reverted": sum(1 for m in modules if m.get("reverted")),
           "iters_used": sum(int(m.get("iters", 0)) for m in modules)}
    if rec:
        out["heldout_error_ratio"] = statistics.geometric_mean(
            [max(m["reconstructed_error"], 1e-12) / max(m["init_error"], 1e-12) for m in rec])
    return out


class TimeBudgetSpent(Exception):
    """A run was not started: the command's time budget was spent."""


def pending(specs: list[dict], data: dict) -> list[dict]:
    """The specs ``data`` holds no run of, once each; and those asking for the unseen images' score that a run
    recorded without it (they run again)."""
    before = {spec_key(r): r for r in data["runs"]}
    return [s for s in dict((spec_key(s), s) for s in specs).values()
            if spec_key(s) not in before or (s.get("unseen") and "unseen_top1" not in before[spec_key(s)])]


def run_specs(specs: list[dict], path: Path, jobs: int = 1, timeout: Optional[float] = None,
              on_result: Optional[Callable[[dict], None]] = None, time_budget: Optional[float] = None) -> dict:
    """Run every spec not yet in ``path`` (``jobs`` at a time) and save after each one; return the data.

    With ``time_budget`` (seconds), no run starts after it and a run still going then is stopped unrecorded;
    the next call resumes from the file.
    """
    deadline = None if time_budget is None else time.monotonic() + time_budget

    def run(spec: dict) -> dict:
        if deadline is None:
            return run_in_subprocess(spec, timeout)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeBudgetSpent
        return run_in_subprocess(spec, left if timeout is None else min(timeout, left))

    data = load_results(path)
    before = {spec_key(r): r for r in data["runs"]}
    todo = pending(specs, data)
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} already in {path}, {len(todo)} to run "
          f"({jobs} at a time).", flush=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, s): s for s in todo}
        for n, future in enumerate(as_completed(futures), 1):
            spec = futures[future]
            label = f"{spec['model']} {spec['preset']} W{spec['w_bits']}A{spec['a_bits']} {spec['tag']} " \
                    f"iters={spec['iters']} seed={spec['seed']}"
            try:
                result = future.result()
            except TimeBudgetSpent:
                print(f"[{n}/{len(todo)}] not started (time budget spent): {label}", flush=True)
                continue
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"[{n}/{len(todo)}] FAILED {label}: {err}", file=sys.stderr, flush=True)
                continue
            data = add_result(path, result)
            earlier = before.get(spec_key(spec))
            again = f" (recorded before: {earlier['top1']:.2f})" if earlier else ""
            unseen = f", unseen {result['unseen_top1']:.2f}" if "unseen_top1" in result else ""
            print(f"[{n}/{len(todo)}] {label}: top1 {result['top1']:.2f}{again}{unseen} calib "
                  f"{result['calib_seconds']:.0f} s [{(time.perf_counter() - started) / 60:.1f} min]", flush=True)
            if on_result is not None:
                on_result(data)
    return data


if __name__ == "__main__":  # worker entry point: python bench/harness.py '<spec json>'
    print(RESULT_PREFIX + json.dumps(run_one(json.loads(sys.argv[1]))), flush=True)
