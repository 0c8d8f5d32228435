"""What ``ADFQCallback`` and ``ADFQModule`` share: preparing the model, the engine on this rank's shard, the
recipe check on restore, what loggers get per module, what the run costs, and the run report and its summary."""

from __future__ import annotations

from typing import Any, Optional

from tqdm.auto import tqdm

import lightning.pytorch as pl
from torch import nn

from ..api import allocated_config, prepare
from ..checkpoint import recipe_differences
from ..config import ADFQConfig
from ..data.calibration import collect_images
from ..quantizers import Quantizer
from ..reconstruction import Reconstructor, Stage
from ..reconstruction.cross_rank import bound_collectives
from ..quantization_report import summarize
from .run_report import write_run_report
from .sharding import calibration_loader, calibration_shard


class ReconstructionDriver:
    """One quantization run inside a Trainer: the recipe, the engine, and the Lightning plumbing around it."""

    def __init__(self, config: ADFQConfig, collective_timeout: Optional[float] = 120.0) -> None:
        if collective_timeout is not None and not collective_timeout > 0:
            raise ValueError(f"collective_timeout={collective_timeout!r} must be a positive number of seconds "
                             "(or None).")
        self.config = config
        self.collective_timeout = collective_timeout
        self.engine: Optional[Reconstructor] = None
        self.resume_state: Optional[dict] = None  # an engine state restored from a checkpoint, loaded at start
        self.allocation: Optional[dict] = None  # what allocate_bits chose under config.bit_budget, for the report

    @property
    def stages(self) -> list[Stage]:
        return self.engine.stages if self.engine is not None else []

    def prepare(self, model: nn.Module, trainer: Optional[pl.Trainer] = None, loader: Optional[Any] = None,
                limit: Optional[int] = None) -> None:
        """Swap in the quantized modules before a strategy wraps the model and optimizers are built.

        Under a ``bit_budget`` the widths are allocated first, on the calibration images (``loader``, else the
        datamodule's) on the device the run uses; from then on :attr:`config` holds them as ``overrides``, which is
        what checkpoints and the report keep. Quantizer parameters start frozen, so DistributedDataParallel
        registers none of them: their shapes are only known at calibration, and reconstruction sums their
        gradients over ranks itself.
        """
        if self.config.bit_budget is not None:
            self._allocate(model, trainer, loader, limit)
        prepare(model, self.config)
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.requires_grad_(False)

    def start(self, trainer: pl.Trainer, model: nn.Module, loader: Optional[Any] = None,
              limit: Optional[int] = None) -> Reconstructor:
        """The engine over this rank's shard of the calibration images (``loader``, else the datamodule's),
        resumed from :attr:`resume_state` when a checkpoint gave one."""
        bound_collectives(self.collective_timeout)  # every rank starts here, in the same order
        images, ids, n = calibration_shard(trainer, loader, limit)
        device = trainer.strategy.root_device
        self.engine = Reconstructor(model.eval(), self.config, images, ids, n, device=device)
        if self.resume_state is not None:
            self.engine.load_state_dict(self.resume_state)
        return self.engine

    def _allocate(self, model: nn.Module, trainer: pl.Trainer, loader: Optional[Any], limit: Optional[int]) -> None:
        """Choose the widths under ``config.bit_budget`` (rank 0's choice on every rank), say what was reached."""
        bound_collectives(self.collective_timeout)  # every rank gets here, in the same order
        device = trainer.strategy.root_device
        images = collect_images(calibration_loader(trainer, loader), limit=limit).to(device)
        self.config, self.allocation = allocated_config(model.to(device), images, self.config)
        reached = {k: v for k, v in self.allocation["reached"].items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics({f"allocation/{k}": v for k, v in reached.items()}, step=0)
        if trainer.is_global_zero:
            averages = ", ".join(f"{k} {v:.2f}" for k, v in reached.items())
            tqdm.write(f"bit allocation: {len(self.allocation['layers'])} widths chosen in "
                       f"{self.allocation['seconds']:.0f} s, averages {averages}")

    def adopt_allocation(self, saved: Optional[dict]) -> None:
        """A run that only evaluates a checkpoint takes the widths that checkpoint's fit allocated under the same
        ``bit_budget`` (it holds them as ``overrides``) rather than allocating again."""
        if self.config.bit_budget is not None and saved and saved.get("bit_budget") is None:
            self.config = self.config.replace(bit_budget=None, overrides=ADFQConfig(**saved).overrides)

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
        """Rank 0 writes ``adfq_report.json`` and returns its path; every rank must call this (``trainer.log_dir``
        is a broadcast)."""
        return write_run_report(trainer, self.config, self.stages, model_name, evaluation, self.allocation)[0]

    def finish(self, trainer: pl.Trainer, model_name: str, evaluation: Optional[dict] = None) -> None:
        """Write the report and, on rank 0, print its summary; every rank must call this."""
        path, report = write_run_report(trainer, self.config, self.stages, model_name, evaluation, self.allocation)
        if path is not None and report["modules"]:
            tqdm.write(summarize(report, str(path)))

    @staticmethod
    def announce_budget(trainer: pl.Trainer, engine: Reconstructor, who: str) -> None:
        """Say on rank 0, once at the start, what the reconstruction costs: modules x iterations."""
        done, total = engine.progress()
        if not trainer.is_global_zero or engine.done:
            return
        cfg = engine.config
        what = (f"{len(engine.stages)} modules x {cfg.iters:,} iterations = {total:,} reconstruction iterations"
                if cfg.reconstruct else f"{len(engine.stages)} modules, calibration only (reconstruct=False)")
        resumed = f", {done:,} done already" if done else ""
        tqdm.write(f"{who}: {what}{resumed}. ADFQConfig(iters=...) sets the budget per module.")

    @staticmethod
    def announce_eta(trainer: pl.Trainer, engine: Reconstructor, stage: Stage) -> None:
        """After the first module, say on rank 0 how long the rest should take at that pace."""
        left = len(engine.stages) - engine.stage
        if not trainer.is_global_zero or stage is not engine.stages[0] or left <= 0:
            return
        seconds = float(stage.stats.get("seconds", 0.0))
        tqdm.write(f"first module took {seconds:.1f} s: about {_duration(seconds * left)} for the other {left}.")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
