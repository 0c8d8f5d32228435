"""``adfq-vit-export``: export the quantized model of an ``adfq-vit fit`` or ``ADFQCallback`` checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch

from ..export import FORMATS, export_all
from .callback import load_quantized_vit
from .errors import DEBUG_ENV, run_reporting_errors
from .module import ADFQModule


def _quantized_model(ckpt_path: str, parser: argparse.ArgumentParser):
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if any(key.split("{")[0] == "ADFQCallback" for key in checkpoint.get("callbacks", {})):
        return load_quantized_vit(ckpt_path)
    if "config" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(f"{ckpt_path} was saved neither by adfq-vit fit nor by a Trainer with ADFQCallback: "
                         "export a model you quantized in Python with adfq_lightning.export.export_quantized().")
    engine = checkpoint.get("adfq_engine", {})
    if not engine or engine["stage"] < len(engine["stats"]):
        parser.error(f"{ckpt_path} holds an unfinished calibration (module {engine.get('stage', 0)} of "
                     f"{len(engine.get('stats', []))}): resume it with adfq-vit fit --ckpt_path, then export.")
    return ADFQModule.load_from_checkpoint(ckpt_path, map_location="cpu").eval().model


def main(argv: Optional[list[str]] = None) -> None:
    """``adfq-vit-export``: export the quantized model of an ``adfq-vit fit`` checkpoint, or of a checkpoint of your
    own Trainer with ``ADFQCallback``.

    On the command line (``argv`` None) the library's errors print as one line; with ``argv`` given they raise."""
    parser = argparse.ArgumentParser(prog="adfq-vit-export", description=main.__doc__,
                                     epilog=f"Errors print one line; set {DEBUG_ENV}=1 for their traceback.")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of adfq-vit fit (e.g. .../checkpoints/last.ckpt) "
                        "or of a Trainer with ADFQCallback")
    parser.add_argument("--format", nargs="+", default=["safetensors"], choices=FORMATS, dest="formats")
    parser.add_argument("--output", required=True, help="output path without suffix, e.g. exports/vit_w4a4")
    args = parser.parse_args(argv)
    if not Path(args.ckpt_path).is_file():
        parser.error(f"no checkpoint at {args.ckpt_path}")

    def export() -> None:
        model = _quantized_model(args.ckpt_path, parser)
        for path in export_all(model, Path(args.output), args.formats):
            print(f"exported {path} ({os.path.getsize(path) / 2**20:.2f} MiB)")

    run_reporting_errors("adfq-vit-export", export, command_line=argv is None)


if __name__ == "__main__":
    main()
