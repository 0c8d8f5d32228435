"""Study, part 2: each allocation (solved from the measured costs) and the uniform widths, quantized without
reconstruction (ADFQ's initialised quantizers), scored on the 5,000 validation images: does the summed cost
predict the whole model's KL to FP32 at 2 bits as it does at 3-4?"""
import json
import sys
from pathlib import Path

import timm.data
import torch

sys.path.insert(0, sys.argv[2])
from harness import calibration_and_scoring, kl_to_fp, make_spec  # noqa: E402

from adfq_lightning import ADFQConfig, prepare  # noqa: E402
from adfq_lightning.allocation import choose_widths  # noqa: E402
from adfq_lightning.data import cifar10_eval_transform  # noqa: E402
from adfq_lightning.reconstruction import Reconstructor  # noqa: E402
from adfq_lightning.zoo import create_reference_model  # noqa: E402

torch.set_num_threads(1)
name = sys.argv[1]
budgets = [b for b in sys.argv[3].split(",")]  # e.g. u3,u4,m3.0_2bit,m3.5,m4.0
report = json.loads(Path(__file__).with_name(f"alloc_{name}.json").read_text())
layers = report["layers"]


def solve(bits: float, widths: tuple) -> dict:
    groups = [0 if u["kind"] == "weights" else 1 for u in layers]
    totals = [sum(u["size"] for u, g in zip(layers, groups) if g == k) for k in (0, 1)]
    chosen = choose_widths([[u["kl"][str(b)] for b in widths] for u in layers],
                           [[u["size"] * b for b in widths] for u in layers], groups, [bits * t for t in totals])
    return {u["name"] + ("/w" if u["kind"] == "weights" else "/a"): widths[k] for u, k in zip(layers, chosen)}


def uniform(bits: int) -> dict:
    return {u["name"] + ("/w" if u["kind"] == "weights" else "/a"): bits for u in layers}


def predicted(choice: dict) -> float:
    return sum(u["kl"][str(choice[u["name"] + ("/w" if u["kind"] == "weights" else "/a")])] for u in layers)


def overrides(choice: dict) -> dict:
    out = {}
    for key, bits in choice.items():
        layer, kind = key.rsplit("/", 1)
        out.setdefault(layer, {})[f"{kind}_bits"] = bits
    return out


spec = make_spec(name, "adfq", 4, seed=0, iters=1000)
calib_u8, scoring = calibration_and_scoring(spec)
val_u8, labels = scoring["val"]
out_path = Path(__file__).with_name(f"no_recon_{name}.json")
results = json.loads(out_path.read_text()) if out_path.is_file() else {}
for b in budgets:
    if b in results:
        continue
    choice = {"u3": lambda: uniform(3), "u4": lambda: uniform(4), "m3.0_2bit": lambda: solve(3.0, (2, 3, 4, 6, 8)),
              "m3.5": lambda: solve(3.5, (3, 4, 6, 8)), "m4.0": lambda: solve(4.0, (3, 4, 6, 8))}[b]()
    model = create_reference_model(name, pretrained=True).eval()
    transform = cifar10_eval_transform(timm.data.resolve_data_config(model=model))
    with torch.no_grad():
        fp = torch.cat([model(transform(val_u8[i:i + 500])) for i in range(0, len(val_u8), 500)])
    config = ADFQConfig.preset("adfq_init", w_bits=4, a_bits=4, seed=0)
    config = config.replace(overrides={**config.overrides, **overrides(choice)})
    images = transform(calib_u8)
    prepare(model, config)
    Reconstructor(model, config, images, torch.arange(len(images)), len(images)).run()
    with torch.no_grad():
        q = torch.cat([model(transform(val_u8[i:i + 500])) for i in range(0, len(val_u8), 500)])
    results[b] = {"predicted": predicted(choice), "kl_to_fp": kl_to_fp(q, fp),
                  "top1": float((q.argmax(1) == labels).float().mean()) * 100,
                  "widths": {k: v for k, v in choice.items()}}
    out_path.write_text(json.dumps(results, indent=1))
    print(name, b, {k: round(v, 4) for k, v in results[b].items() if k != "widths"}, flush=True)
