"""``PredictionWriter``: where ``adfq-vit predict`` puts the quantized model's predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..atomic import atomic_torch_save

PREDICTIONS_NAME = "predictions.pt"


class PredictionWriter(BasePredictionWriter):
    """Write every rank's predictions (``probs``, ``pred`` and, when the batches have them, ``labels``) to
    ``<log_dir>/predictions[_rank<r>].pt`` at the end of ``predict``."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.path: Optional[Path] = None

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Optional[Sequence[Any]]) -> None:
        outputs = {key: torch.cat([p[key].cpu() for p in predictions]) for key in ("probs", "pred")}
        labels = [p["labels"].cpu() for p in predictions if "labels" in p]
        if labels:
            outputs["labels"] = torch.cat(labels)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / PREDICTIONS_NAME.replace(".pt", f"{suffix}.pt")
        atomic_torch_save(outputs, self.path)
        print(f"predictions of {len(outputs['pred'])} images written to {self.path}")
