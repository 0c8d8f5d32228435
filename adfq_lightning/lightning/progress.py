"""Progress of a reconstruction run in Lightning's progress bar."""

from __future__ import annotations

from typing import Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """tqdm progress bar that also names the module being reconstructed."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Union[int, str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        engine = getattr(pl_module, "engine", None)
        if engine is not None and not engine.done:
            metrics["module"] = f"{engine.stage + 1}/{len(engine.stages)} {engine.current.name}"
        return metrics
