"""Export from Lightning: the ``ExportQuantized`` callback (at the end of ``fit``) and ``adfq-vit-export``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
import timm.data
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..config import ADFQConfig
from ..export import FORMATS, export_onnx, export_program, export_quantized
from .callback import ADFQCallback, find_vit
from .module import ADFQModule

SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "pt2": ".pt2"}


def example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random batch at the model's input size (what tracing needs; the exports keep the batch size dynamic)."""
    size = timm.data.resolve_data_config(model=model)["input_size"]
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def export_all(model: nn.Module, stem: Path, formats: Sequence[str], config: ADFQConfig, model_name: Optional[str],
               model_kwargs: Optional[dict]) -> list[Path]:
    """Write ``stem.<suffix>`` for every format; every file is complete or absent."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}: choose from {list(FORMATS)}.")
    example = example_input(model).to(next(model.parameters()).device)
    writers = {"safetensors": lambda p: export_quantized(model, p, config, model_name, model_kwargs),
               "onnx": lambda p: export_onnx(model, p, example),
               "pt2": lambda p: export_program(model, p, example)}
    return [writers[fmt](stem.with_name(stem.name + SUFFIXES[fmt])) for fmt in formats]


class ExportQuantized(Callback):
    """Export the quantized model when ``fit`` ends (``ADFQModule``, or a module quantized by ``ADFQCallback``).

    Files go to ``dirpath`` (default: the run's log directory) as ``<name>.safetensors``/``.onnx``/``.pt2``.
    """

    def __init__(self, dirpath: Optional[str] = None, formats: Sequence[str] = ("safetensors",),
                 name: str = "quantized") -> None:
        self.dirpath, self.formats, self.name = dirpath, list(formats), name
        self.paths: list[Path] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, ADFQModule):
            model, config = pl_module.model, pl_module.config
            name, kwargs = pl_module.hparams.model, pl_module.hparams.model_kwargs
        else:
            callbacks = [c for c in trainer.callbacks if isinstance(c, ADFQCallback)]
            if not callbacks:
                raise ValueError("ExportQuantized needs an ADFQModule or an ADFQCallback in the same Trainer.")
            model, config = find_vit(pl_module, callbacks[0].model_attr), callbacks[0].config
            name, kwargs = None, None
        directory = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            self.paths = export_all(model, directory / self.name, self.formats, config, name, kwargs)
            for path in self.paths:
                print(f"exported {path} ({os.path.getsize(path) / 2**20:.2f} MiB)")


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
