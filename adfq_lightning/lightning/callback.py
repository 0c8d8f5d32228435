"""``ADFQCallback``: add ADFQ-ViT post-training quantization to any Lightning Trainer."""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from ..api import is_calibrated, is_converted, prepare
from ..config import ADFQConfig
from ..reconstruction import Reconstructor
from .report import write_run_report
from .sharding import shard_by_rank

log = logging.getLogger(__name__)


def find_vit(pl_module: pl.LightningModule, model_attr: Optional[str]) -> nn.Module:
    """The timm ViT/DeiT/Swin inside a LightningModule: ``model_attr`` or the first one found."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if model_attr:
        model = getattr(pl_module, model_attr, None)
        if not isinstance(model, nn.Module):
            raise AttributeError(f"{type(pl_module).__name__} has no module attribute {model_attr!r} (ADFQCallback.model_attr).")
        return model
    for module in pl_module.modules():
        if isinstance(module, (VisionTransformer, SwinTransformer)):
            return module
    raise TypeError(f"{type(pl_module).__name__} holds no timm VisionTransformer/SwinTransformer: pass "
                    "ADFQCallback(model_attr='<attribute of your model>').")


class ADFQCallback(Callback):
    """Quantize the ViT of a LightningModule (W4A4 by default) when the Trainer sets up.

    In ``setup`` — before a strategy wraps the model and before optimizers are built, like Lightning's own
    model-transforming callbacks — float modules are swapped for quantized ones. Then, unless a checkpoint
    is about to be restored (``ckpt_path``) or ``calibrate=False`` (the reconstruction LightningModule drives
    calibration itself as training steps), activation calibration and ASMO reconstruction run on the
    calibration images: ``calib_dataloader``, else the datamodule's ``train_dataloader()``. Under DDP each
    rank keeps only its strided shard of them.

    Args:
        config: the quantization recipe (default: W4A4 ADFQ).
        model_attr: attribute of the LightningModule holding the timm model (default: first ViT found).
        calib_dataloader: calibration images (tensors or (images, labels) batches).
        num_calib: calibration images used (1024 in the paper).
        calibrate: False to only swap modules.
    """

    def __init__(self, config: Optional[ADFQConfig] = None, model_attr: Optional[str] = None,
                 calib_dataloader: Optional[DataLoader] = None, num_calib: int = 1024, calibrate: bool = True) -> None:
        self.config = config or ADFQConfig()
        self.model_attr = model_attr
        self.calib_dataloader = calib_dataloader
        self.num_calib = num_calib
        self.calibrate = calibrate
        self.stages: list = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = find_vit(pl_module, self.model_attr)
        if is_converted(model) and is_calibrated(model):
            return
        prepare(model, self.config)
        if not self.calibrate or trainer.ckpt_path:
            return  # a quantized checkpoint is about to be loaded into the swapped modules
        images, ids, n = shard_by_rank(self._calibration_batches(trainer), trainer.global_rank, trainer.world_size,
                                       self.num_calib)
        if n < self.num_calib and trainer.is_global_zero:
            log.warning("ADFQCallback: num_calib=%d but the calibration loader yields only %d images; calibrating on "
                        "those %d. Give more images or lower num_calib to silence this.", self.num_calib, n, n)
        model.to(trainer.strategy.root_device).eval()
        engine = Reconstructor(model, self.config, images, ids, n)
        engine.run(log=lambda name, it, terms: self._log(trainer, name, it, terms))
        self.stages = engine.stages
        self._write_report(trainer, type(model).__name__)

    def _calibration_batches(self, trainer: pl.Trainer) -> Any:
        if self.calib_dataloader is not None:
            return self.calib_dataloader
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        raise ValueError("ADFQCallback needs calibration images: pass calib_dataloader=... or run the Trainer with a "
                         "datamodule whose train_dataloader() yields them.")

    def _log(self, trainer: pl.Trainer, name: str, iteration: int, terms: dict) -> None:
        if iteration % 100 == 0 or iteration == self.config.iters:
            for logger in trainer.loggers:
                logger.log_metrics({f"recon/{name}/{k}": v for k, v in terms.items()}, step=iteration)

    def _write_report(self, trainer: pl.Trainer, model_name: str) -> None:
        path = write_run_report(trainer, self.config, self.stages, model_name)
        if path is not None:
            log.info("ADFQ report written to %s", path)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}
