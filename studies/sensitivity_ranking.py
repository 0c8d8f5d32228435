"""Does allocate_bits' cost measure rank allocations the way their result does? (vit_cifar, BitBudget(3.5, 3.5),
seed 0, 1,000 it/module.)

    python studies/sensitivity_ranking.py make      # random feasible allocations and their predicted cost
    # each one, as the benchmark runs it (N = 0..7, the overrides from studies/random_allocations.json):
    python -m bench accuracy --groups budget --bits 4 --budget-iters 1000 --models vit_cifar --seeds 0 \\
        --changes '{"overrides": <overrides of N>}' --tag random_alloc_N
    python studies/sensitivity_ranking.py rank      # Spearman of predicted cost against KL to FP32 and Top-1

Allocations: the integer program solved with each layer's measured KL mixed with noise (weight λ on the KL),
so that they span random (λ = 0) to near the allocator's choice; every one meets the budget.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
ALLOCS = HERE / "random_allocations.json"


def make() -> None:
    import numpy as np
    import timm.data
    import torch

    from adfq_lightning import ADFQConfig, BitBudget, allocate_bits
    from adfq_lightning.allocation import choose_widths
    from adfq_lightning.data import cifar10_eval_transform
    from adfq_lightning.zoo import create_reference_model
    from bench.harness import calibration_and_validation

    torch.set_num_threads(1)
    calib_u8, _, _ = calibration_and_validation(1024, 0, 0)
    model = create_reference_model("vit_cifar", pretrained=True)
    images = cifar10_eval_transform(timm.data.resolve_data_config(model=model))(calib_u8)
    config = ADFQConfig.preset("adfq", w_bits=4, a_bits=4, seed=0, iters=1000, batch_size=32)
    budget = BitBudget(3.5, 3.5)
    _, report = allocate_bits(model.eval(), images, budget, config, report=True)
    layers, widths = report["layers"], budget.candidates
    kl = np.array([[layer["kl"][str(b)] for b in widths] for layer in layers])
    size = [[layer["size"] * b for b in widths] for layer in layers]
    group = [0 if layer["kind"] == "weights" else 1 for layer in layers]
    totals = [sum(layer["size"] for layer in layers if layer["kind"] == k) for k in ("weights", "activations")]
    rng = np.random.default_rng(0)
    out = []
    for i, lam in enumerate([0.0, 0.0, 0.0, 0.02, 0.05, 0.1, 0.2, 0.4]):
        cost = lam * kl + (1 - lam) * rng.uniform(0, 1, kl.shape) * kl.mean()
        chosen = choose_widths(cost.tolist(), size, group, [3.5 * t for t in totals])
        overrides = dict(ADFQConfig().overrides)
        for layer, k in zip(layers, chosen):
            key = "w_bits" if layer["kind"] == "weights" else "a_bits"
            overrides[layer["name"]] = {**overrides.get(layer["name"], {}), key: widths[k]}
        out.append({"tag": f"random_alloc_{i}", "lambda": lam, "overrides": overrides,
                    "predicted_kl": float(sum(kl[j, k] for j, k in enumerate(chosen)))})
    allocated = float(sum(kl[j, widths.index(layer["bits"])] for j, layer in enumerate(layers)))
    ALLOCS.write_text(json.dumps({"allocated_predicted_kl": allocated, "allocs": out}))


def rank() -> None:
    from scipy.stats import spearmanr

    runs = json.loads((HERE.parent / "bench/results/accuracy.json").read_text())["runs"]
    allocs = json.loads(ALLOCS.read_text())
    points = [(a["predicted_kl"], r) for a in allocs["allocs"] for r in runs if r.get("tag") == a["tag"]]
    points += [(allocs["allocated_predicted_kl"], r) for r in runs if r.get("tag") == "mixed_3.5"
               and r["model"] == "vit_cifar" and r["seed"] == 0]
    for predicted, r in sorted(points, key=lambda p: p[0]):
        print(f"{r['tag']:16s} predicted KL {predicted:.4f}  KL to FP32 {r['kl_to_fp']:.4f}  Top-1 {r['top1']:.2f}")
    x = [p for p, _ in points]
    print("Spearman, predicted against KL to FP32:", round(spearmanr(x, [r["kl_to_fp"] for _, r in points])[0], 2))
    print("Spearman, predicted against Top-1:", round(spearmanr(x, [r["top1"] for _, r in points])[0], 2))


if __name__ == "__main__":
    {"make": make, "rank": rank}[sys.argv[1]]()
