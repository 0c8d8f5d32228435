"""The time tables: calibration time and memory of each method, iteration times against their floor, the
projection to the paper's budget, CUDA graphs; and every export format's size and parity."""

from __future__ import annotations

import statistics

from tables import ACC, LABELS, MODELS, accuracy_runs, machines, table

PAPER_IMAGES, PAPER_ITERS, PAPER_BATCH = 1024, 3000, 32


def projection(r: dict) -> dict:
    """The paper's budget from the measured per-module costs: preparation scaled linearly to 1,024 images,
    iteration time to batch 32 and 3,000 iterations."""
    scale_images, scale_batch = PAPER_IMAGES / r["num_calib"], PAPER_BATCH / r["batch_size"]
    prepare = sum(m["prepare_s"] + m["finish_s"] for m in r["modules"]) * scale_images
    iterate = sum(m["iter_s"] for m in r["modules"]) * PAPER_ITERS * scale_batch
    per_kind, over_floor = {}, {}
    for k in ("attention", "mlp"):
        its = [m["iter_s"] for m in r["modules"] if m["kind"] == k]
        per_kind[k] = statistics.mean(its) if its else None
        ratios = [m["iter_s"] / m["floor_s"] for m in r["modules"] if m["kind"] == k and m.get("floor_s")]
        over_floor[k] = statistics.mean(ratios) if ratios else None
    return {"hours": (prepare + iterate + r["weight_search_s"]) / 3600, "per_kind_iter_s": per_kind,
            "over_floor": over_floor,
            "max_cache_mb_1024": max(m["cache_mb"] for m in r["modules"]) * scale_images}


def device_name(r: dict) -> str:
    m = r.get("machine", {})
    if r.get("gpu"):
        return f"{r['gpu']} ({'CUDA graphs' if r.get('cuda_graphs') else 'eager'})"
    compiled = ", torch.compile" if r.get("torch_compile") else ""
    return f"{m.get('cpu_count', '?')}-core {m.get('cpu_model', 'CPU')} ({r['threads']} threads{compiled})"


def speed_table(data: dict, gpu: bool) -> list[str]:
    runs = [r for r in data["runs"] if bool(r.get("gpu")) == gpu]
    rows = []
    for r in runs:
        p = projection(r)
        k = p["per_kind_iter_s"]
        peak = r.get("peak_gpu_mb") or r.get("peak_rss_mb")
        floor = p["over_floor"]
        rows.append([r["model"], device_name(r), f"{r['num_calib']} / {r['batch_size']} / {r['iters']}",
                     f"{k['attention']:.3f} / {k['mlp']:.3f}",
                     "–" if floor["attention"] is None else f"{floor['attention']:.1f}x / {floor['mlp']:.1f}x", f"{p['max_cache_mb_1024'] / 1024:.1f} GB",
                     f"{peak / 1024:.1f} GB", f"{p['hours']:.2f} h ({p['hours'] * 60:.0f} min)" if gpu else
                     f"{p['hours']:.1f} h", f"{r['total_s'] / 60:.1f} min"])
    lines = table(["model", "device", "images / batch / it per module", "s/iter attention / MLP",
                   "iteration / matmul floor, attention / MLP", "largest module cache at 1,024 images", "peak memory", "projected paper budget", "measured run"],
                  rows, ["---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:"])
    commands = sorted({r.get("command", "python -m bench speed") for r in runs}, key=len)
    torch = sorted({str(r.get("machine", {}).get("torch", r.get("torch", "?"))).split("+")[0] for r in runs})
    return lines + ["", f"*Regenerate: {'; '.join(f'`{c}`' for c in commands)}. torch {', '.join(torch)}; random "
                        "weights at 224 px, W4A4. The paper's budget (1,024 images, batch 32, 3,000 iterations per "
                        "module) is projected from the measured run: iteration time scaled to batch 32, per-module "
                        "preparation to 1,024 images. An estimate, not a run. The floor of an iteration is its matmul "
                        "FLOPs, forward and backward, over the device's measured fp32 matmul throughput (– where "
                        "a run predates that measurement).*"]


def cuda_graphs_table(data: dict) -> list[str]:
    if not data.get("runs"):
        return ["–"]
    rows = [[f"`{r['model']}`", f"{r['bit_identical']} / {r['tensors']}", f"{r['max_abs_diff']:.1e}",
             f"{r['logits_max_abs_diff']:.1e}", f"{r['prediction_agreement']:.2f} %",
             f"{r['top1_eager']:.2f} / {r['top1_graphed']:.2f}", f"{r['seconds_eager']:.1f} / {r['seconds_graphed']:.1f}"]
            for r in data["runs"]]
    m = data["machine"]
    lines = table(["model", "tensors bit-identical", "largest difference", "logits largest difference",
                   "same prediction", "Top-1 eager / graphed", "reconstruction s eager / graphed"], rows,
                  ["---"] + ["---:"] * 6)
    return lines + ["", f"*Regenerate: `{data['command']}` (needs a GPU). Machine: {m.get('gpu')}, torch "
                        f"{str(m.get('torch')).split('+')[0]}. W{data['bits']}A{data['bits']}, {data['num_calib']} "
                        f"calibration images, {data['iters']} iterations per module with rounding hardened half way "
                        "(each module captured twice), one seed.*"]


def export_tables(r: dict) -> list[str]:
    if not r:
        return ["–"]
    fp32, fp16 = r["fp32_bytes"], r["fp16_bytes"]
    sizes = [["FP32 state_dict", f"{fp32 / 1024:.0f} KiB", "1.00", ""],
             ["FP16 state_dict", f"{fp16 / 1024:.0f} KiB", f"{fp32 / fp16:.2f}x smaller", "1.00"]]
    sizes += [[f"W4A4 {name}", f"{size / 1024:.0f} KiB", f"{fp32 / size:.2f}x smaller", f"{fp16 / size:.2f}x smaller"]
              for name, size in r["sizes"].items()]
    parity = [[name, f"{p['top1']:.2f}", f"{p['max_abs_diff']:.2e}" if "max_abs_diff" in p else "–",
               f"{p['agreement']:.2f} %" if "agreement" in p else "–"] for name, p in r["parity"].items()]
    base = r["seconds_per_batch_64"]["FP32 eager"]
    speed = [[name, f"{s * 1000:.1f}", f"{s / base:.2f}x"] for name, s in r["seconds_per_batch_64"].items()]
    m = r["machine"]
    return (table(["file", "size", "vs FP32 state_dict", "vs FP16"], sizes, ["---", "---:", "---:", "---:"]) + [""]
            + table(["model", "Top-1 (5,000 val images)", "max abs logit difference to fake-quant",
                     "same prediction as fake-quant"], parity, ["---", "---:", "---:", "---:"]) + [""]
            + table(["inference, batch of 64", "ms", "vs FP32 eager"], speed, ["---", "---:", "---:"])
            + ["", f"*Regenerate: `{r['command'].strip()}`. Machine: {m['cpu_count']}-core {m['cpu_model']} CPU, "
                   f"{r['threads']} threads, torch {str(m['torch']).split('+')[0]}. `vit_cifar` at W4A4 with the shipped "
                   f"config's recipe ({r['config']['iters']:,} iterations per module), calibration seed "
                   f"{r['config']['seed']}; one run.*"])


def calibration_time_line(speed: dict) -> list[str]:
    """README: one line on calibration time at real sizes."""
    gpu = [r for r in speed["runs"] if r.get("gpu") and r.get("cuda_graphs") and r["model"] == "deit_small_patch16_224"]
    cpu = [r for r in speed["runs"] if not r.get("gpu") and r["model"] == "deit_small_patch16_224"]
    if not gpu or not cpu:
        return ["–"]
    g = max(gpu, key=lambda r: r["num_calib"] * r["iters"])
    c = cpu[0]
    return [f"DeiT-S at W4A4 with the paper's budget (1,024 images, 3,000 iterations per module): about "
            f"{projection(g)['hours'] * 60:.1f} min on one {g['gpu']} with CUDA graphs (projected from a "
            f"{g['num_calib']:,}-image, {g['iters']:,}-iteration run that took {g['total_s'] / 60:.1f} min), "
            f"{projection(c)['hours']:.0f} h on {c['machine'].get('cpu_count', 2)} CPU cores (projected)."]


def timing_table(data: dict) -> list[str]:
    runs = accuracy_runs(data, threads=2)
    rows = []
    for model in MODELS:
        for preset in ("minmax", "percentile", "adfq_init", "adfq"):
            for r in [r for r in runs if r["model"] == model and r["preset"] == preset and not r["changes"]][:1]:
                label = LABELS.get(preset, f"ADFQ, {r['iters']} it/module")
                rows.append([f"`{model}`", label, f"{r['top1']:.2f}", f"{r['calib_seconds']:.1f} s",
                             f"{r['peak_mem_mb']:.0f} MB" if r.get("peak_mem_mb") is not None else "–"])
    lines = table(["model", "method", "W4A4 Top-1", "calibration wall time", "peak memory rise"], rows,
                  ["---", "---", "---:", "---:", "---:"])
    return lines + ["", f"*Regenerate: `{ACC} --groups timing`. Machine: {machines(runs)}; each run alone with two "
                        "threads, seed 0 (one seed: Top-1 rounds differently from the one-thread runs).*"]
