"""Progress of a reconstruction in one view: module k/N, its iterations and loss, and an ETA for the whole run."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.auto import tqdm

from ..reconstruction import Reconstructor


def _describe(engine: Reconstructor) -> str:
    if engine.done:
        return f"{len(engine.stages)}/{len(engine.stages)} done"
    return f"{engine.stage + 1}/{len(engine.stages)} {engine.current.name}"


class ReconstructionProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting reconstruction iterations over every module instead of batches of an epoch.

    The bar's total is the whole run (modules x iterations), so its rate and ETA are the run's; the postfix names
    the module being reconstructed and its loss. Other loops (validation, test) look as usual.
    """

    @staticmethod
    def _engine(pl_module: pl.LightningModule) -> Optional[Reconstructor]:
        engine = getattr(pl_module, "engine", None)
        return engine if isinstance(engine, Reconstructor) else None

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        engine = self._engine(trainer.lightning_module)
        if engine is not None:
            done, total = engine.progress()
            self.train_progress_bar.reset(total=total)
            self.train_progress_bar.update(done)
            self.train_progress_bar.set_description("Reconstruction")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        engine = self._engine(pl_module)
        if engine is None:
            return super().on_train_batch_end(trainer, pl_module, *args)
        bar = self.train_progress_bar
        bar.update(engine.progress()[0] - bar.n)
        bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Union[int, str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: no news to someone watching a calibration
        engine = self._engine(pl_module)
        if engine is not None:
            metrics = {"module": _describe(engine), **metrics}
        return metrics


class CalibrationProgress:
    """The same view for a calibration that runs outside Lightning's loops (``ADFQCallback`` in ``setup``).

    Shown on global rank 0 when the Trainer has a progress bar; ``log``/``on_stage`` are the engine's callbacks.
    """

    def __init__(self, trainer: pl.Trainer, engine: Reconstructor) -> None:
        self.engine = engine
        shown = trainer.is_global_zero and trainer.progress_bar_callback is not None
        done, total = engine.progress()
        self.bar = tqdm(total=total, initial=done, desc="ADFQ calibration", dynamic_ncols=True, disable=not shown)

    def log(self, name: str, iteration: int, terms: dict) -> None:
        self.bar.update(self.engine.progress()[0] - self.bar.n)
        self.bar.set_postfix(module=_describe(self.engine), loss=f"{terms['loss']:.4g}")

    def on_stage(self, stage) -> None:
        self.bar.update(self.engine.progress()[0] - self.bar.n)
        self.bar.set_postfix(module=_describe(self.engine))

    def close(self) -> None:
        self.bar.close()
