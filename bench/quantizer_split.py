"""Where a model's distance to FP32 comes from: KL(FP32 || quantized) with one kind of quantizer switched on at a
time, all others calibrated but off, for ADFQ without reconstruction (q/k/v grids by L2.4 and by the squared
error) and Percentile. It found the q/k/v grid's cost at 4-8 bits (README, *Every bit width*).

    python bench/quantizer_split.py --model deit_cifar --bits 6 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json

from harness import REPO, calibration_and_validation, kl_to_fp

from adfq_lightning.io import atomic_write

METHODS = {"ADFQ, no reconstruction (q/k/v L2.4, default)": ("adfq_init", {}),
           "ADFQ, no reconstruction (q/k/v squared error)": ("adfq_init", {"qkv_error_p": 2.0}),
           "Percentile (per-tensor)": ("percentile", {})}


def split(model_name: str, bits: int, seed: int, num_val: int) -> dict[str, dict[str, float]]:
    import timm.data
    import torch

    from adfq_lightning import ADFQConfig
    from adfq_lightning.api import prepare
    from adfq_lightning.data import cifar10_eval_transform
    from adfq_lightning.quantizers import AdaRoundQuantizer, outermost_quantizers
    from adfq_lightning.reconstruction import Reconstructor
    from adfq_lightning.zoo import create_reference_model

    calib_u8, val_u8, _ = calibration_and_validation(1024, num_val, seed)
    float_model = create_reference_model(model_name, pretrained=True).eval()
    transform = cifar10_eval_transform(timm.data.resolve_data_config(model=float_model))
    val, images = transform(val_u8), transform(calib_u8)

    @torch.no_grad()
    def logits_of(model) -> torch.Tensor:
        return torch.cat([model(val[i : i + 500]) for i in range(0, len(val), 500)])

    fp = logits_of(float_model)
    table = {}
    for label, (preset, changes) in METHODS.items():
        model = copy.deepcopy(float_model)
        config = ADFQConfig.preset(preset, w_bits=bits, a_bits=bits, seed=seed, **changes)
        prepare(model, config)
        Reconstructor(model, config, images, torch.arange(len(images)), len(images)).run()
        quantizers = [(q, "weights" if isinstance(q, AdaRoundQuantizer) else q.role) for q in outermost_quantizers(model)]
        row = {}
        for kind in ["all", "weights", "activations"] + sorted({k for _, k in quantizers} - {"weights"}):
            for q, k in quantizers:
                q.enabled = kind == "all" or k == kind or (kind == "activations" and k != "weights")
            row[kind] = kl_to_fp(logits_of(model), fp)
        table[label] = row
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_cifar")
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-val", type=int, default=2000)
    args = p.parse_args(argv)
    table = split(args.model, args.bits, args.seed, args.num_val)
    kinds = list(next(iter(table.values())))
    lines = [f"# KL(FP32 ‖ quantized) by quantizer kind: {args.model} W{args.bits}A{args.bits}, calibration seed "
             f"{args.seed}, first {args.num_val} validation images", "",
             f"`python bench/quantizer_split.py --model {args.model} --bits {args.bits} --seed {args.seed}`", "",
             "Each column switches on only that kind of quantizer (all calibrated as in the full model).", "",
             "| method | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    lines += [f"| {label} | " + " | ".join(f"{row[k]:.5f}" for k in kinds) + " |" for label, row in table.items()]
    out = REPO / "bench" / "results" / f"quantizer_split_{args.model}_w{args.bits}.md"
    atomic_write(out.with_suffix(".json"), (json.dumps({"args": vars(args), "kl_to_fp": table}, indent=1) + "\n").encode())
    atomic_write(out, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
