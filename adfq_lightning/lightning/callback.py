"""``ADFQCallback``: add ADFQ-ViT post-training quantization to any Lightning Trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..api import prepare
from ..config import ADFQConfig
from ..modules import is_calibrated, is_converted
from .driver import ReconstructionDriver
from .progress import CalibrationProgress

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
    """Quantize the ViT of a LightningModule (W4A4 by default) for any Trainer entry point.

    In ``setup`` (before a strategy wraps the model and before optimizers are built, like Lightning's own
    model-transforming callbacks) float modules are swapped for quantized ones, their quantizer parameters
    frozen. Calibration and ASMO reconstruction run at the start of ``fit``/``validate``/``test``/``predict``,
    after Lightning has restored a checkpoint: a quantized checkpoint (``ckpt_path=``) is loaded as it is, and
    nothing is recalibrated. Calibration images: ``calib_dataloader``, else the datamodule's
    ``calib_dataloader()``, else its ``train_dataloader()`` (with a warning, since training loaders augment).
    Under DDP each rank keeps only its strided shard of them. Progress shows on rank 0.

    The recipe is part of the checkpoint: restoring one made with another recipe (bits, quantizer choices) is
    refused. To reload your quantized LightningModule outside a Trainer use :func:`load_quantized_checkpoint`.

    Args:
        config: the quantization recipe (default: W4A4 ADFQ).
        model_attr: attribute of the LightningModule holding the timm model (default: first ViT found).
        calib_dataloader: calibration images (tensors or (images, labels) batches), with eval transforms.
        num_calib: calibration images used (1024 in the paper).
    """

    def __init__(self, config: Optional[ADFQConfig] = None, model_attr: Optional[str] = None,
                 calib_dataloader: Optional[Any] = None, num_calib: int = 1024) -> None:
        self.driver = ReconstructionDriver(config or ADFQConfig())
        self.model_attr = model_attr
        self.calib_dataloader = calib_dataloader
        self.num_calib = num_calib

    @property
    def config(self) -> ADFQConfig:
        return self.driver.config

    @property
    def stages(self) -> list:
        """The per-module results of the calibration this callback ran (empty before it, or after a restore)."""
        return self.driver.stages

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = find_vit(pl_module, self.model_attr)
        if is_converted(model) and is_calibrated(model):
            return
        self.driver.prepare(model)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate(trainer, pl_module)

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate once, unless a restored checkpoint already did (evaluation loops run under inference mode:
        reconstruction needs autograd, so it is switched back on here)."""
        model = find_vit(pl_module, self.model_attr)
        if is_calibrated(model):
            return
        with torch.inference_mode(False), torch.enable_grad():
            training = model.training
            engine = self.driver.start(trainer, model, self.calib_dataloader, self.num_calib)
            if engine.num_samples < self.num_calib and trainer.is_global_zero:
                log.warning("ADFQCallback: num_calib=%d but the calibration loader yields only %d images; calibrating "
                            "on those %d. Give more images or lower num_calib to silence this.", self.num_calib,
                            engine.num_samples, engine.num_samples)
            progress = CalibrationProgress(trainer, engine)

            def on_stage(stage, terms) -> None:
                progress.on_stage(stage)
                self.driver.log_stage(trainer.loggers, stage, terms, engine.progress()[0])

            try:
                engine.run(log=progress.log, log_every=10, on_stage=on_stage)
            finally:
                progress.close()
            model.train(training)
        path = self.driver.write_report(trainer, type(model).__name__)
        if path is not None:
            log.info("ADFQ report written to %s", path)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.check_recipe(state_dict["config"], "Use the config it was made with (saved under its "
                                 "'callbacks' entry), or quantize again without ckpt_path.")


def load_quantized_checkpoint(module_cls: type[pl.LightningModule], checkpoint_path: Union[str, Path],
                              model_attr: Optional[str] = None, **kwargs: Any) -> pl.LightningModule:
    """Reload a LightningModule that :class:`ADFQCallback` quantized, from its Lightning checkpoint.

    ``MyModule.load_from_checkpoint(path)`` alone builds the float model and refuses the quantizer entries of
    the state_dict; this loads the float part with it, swaps in the quantized modules with the recipe stored in
    the checkpoint, and loads the complete state. ``kwargs`` go to ``load_from_checkpoint``.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    states = [s for key, s in checkpoint.get("callbacks", {}).items() if key.split("{")[0] == ADFQCallback.__qualname__]
    if not states:
        raise ValueError(f"{checkpoint_path} holds no ADFQCallback state: it was not saved by a Trainer with "
                         "ADFQCallback (for an ADFQModule checkpoint use ADFQModule.load_from_checkpoint).")
    module = module_cls.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    prepare(find_vit(module, model_attr), ADFQConfig(**states[0]["config"]))
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()
