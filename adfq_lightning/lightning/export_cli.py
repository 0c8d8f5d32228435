"""``adfq-vit-export``: export the quantized model of an ``adfq-vit fit`` checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch

from ..export import FORMATS, export_all
from .module import ADFQModule


def main(argv: Optional[list[str]] = None) -> None:
    """``adfq-vit-export``: export the quantized model of an ``adfq-vit fit`` checkpoint."""
    parser = argparse.ArgumentParser(prog="adfq-vit-export", description=main.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of adfq-vit fit (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--format", nargs="+", default=["safetensors"], choices=FORMATS, dest="formats")
    parser.add_argument("--output", required=True, help="output path without suffix, e.g. exports/vit_w4a4")
    args = parser.parse_args(argv)
    if not Path(args.ckpt_path).is_file():
        parser.error(f"no checkpoint at {args.ckpt_path}")
    module = ADFQModule.load_from_checkpoint(args.ckpt_path, map_location="cpu").eval()
    engine = torch.load(args.ckpt_path, map_location="cpu", weights_only=True).get("adfq_engine", {})
    if not engine or engine["stage"] < len(engine["stats"]):
        parser.error(f"{args.ckpt_path} holds an unfinished calibration (module {engine.get('stage', 0)} of "
                     f"{len(engine.get('stats', []))}): resume it with adfq-vit fit --ckpt_path, then export.")
    for path in export_all(module.model, Path(args.output), args.formats, module.config, module.hparams.model,
                           module.hparams.model_kwargs):
        print(f"exported {path} ({os.path.getsize(path) / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
