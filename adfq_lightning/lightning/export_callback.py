"""``ExportQuantized``: export the quantized model of a Trainer run when ``fit`` ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..export import export_all
from .callback import ADFQCallback, find_vit
from .module import ADFQModule


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
