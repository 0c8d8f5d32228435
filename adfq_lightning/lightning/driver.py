"""What ``ADFQCallback`` and ``ADFQModule`` share: preparing the model, the engine on this rank's shard, the
recipe check on restore, what loggers get per module, and the run report."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from torch import nn

from ..api import prepare
from ..checkpoint import recipe_differences
from ..config import ADFQConfig
from ..quantizers import Quantizer
from ..reconstruction import Reconstructor, Stage
from .run_report import write_run_report
from .sharding import calibration_shard


class ReconstructionDriver:
    """One quantization run inside a Trainer: the recipe, the engine, and the Lightning plumbing around it."""

    def __init__(self, config: ADFQConfig) -> None:
        self.config = config
        self.engine: Optional[Reconstructor] = None
        self.resume_state: Optional[dict] = None  # an engine state restored from a checkpoint, loaded at start

    @property
    def stages(self) -> list[Stage]:
        return self.engine.stages if self.engine is not None else []

    def prepare(self, model: nn.Module) -> None:
        """Swap in the quantized modules before a strategy wraps the model and optimizers are built.

        Quantizer parameters start frozen, so DistributedDataParallel registers none of them: their shapes are
        only known at calibration, and reconstruction sums their gradients over ranks itself.
        """
        prepare(model, self.config)
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.requires_grad_(False)

    def start(self, trainer: pl.Trainer, model: nn.Module, loader: Optional[Any] = None,
              limit: Optional[int] = None) -> Reconstructor:
        """The engine over this rank's shard of the calibration images (``loader``, else the datamodule's),
        resumed from :attr:`resume_state` when a checkpoint gave one."""
        images, ids, n = calibration_shard(trainer, loader, limit)
        device = trainer.strategy.root_device
        self.engine = Reconstructor(model.eval(), self.config, images, ids, n, device=device)
        if self.resume_state is not None:
            self.engine.load_state_dict(self.resume_state)
        return self.engine

    def check_recipe(self, saved: Optional[dict], fix: str) -> None:
        """Refuse a checkpoint quantized with another recipe: its quantizers would not fit this config's."""
        differ = recipe_differences(ADFQConfig(**saved), self.config) if saved else []
        if differ:
            raise ValueError(f"this checkpoint was quantized with another recipe than the one configured: "
                             f"{'; '.join(differ)}. {fix}")

    @staticmethod
    def log_stage(loggers: list, stage: Stage, terms: Optional[dict], step: int) -> None:
        """A finished module's errors and last losses go to every logger, whatever ``log_every_n_steps`` says.
        ``step`` only grows over the run (iterations done), so every logger accepts it."""
        metrics = {f"recon/{stage.name}/{k}": float(v) for k, v in stage.stats.items()
                   if isinstance(v, (int, float)) and k != "heldout_images"}
        if terms is not None:
            metrics.update({f"recon/{stage.name}/{k}": float(v) for k, v in terms.items() if k != "beta"})
        for logger in loggers:
            logger.log_metrics(metrics, step=step)

    def write_report(self, trainer: pl.Trainer, model_name: str, evaluation: Optional[dict] = None):
        """Rank 0 writes ``adfq_report.json``; every rank must call this (``trainer.log_dir`` is a broadcast)."""
        return write_run_report(trainer, self.config, self.stages, model_name, evaluation)
