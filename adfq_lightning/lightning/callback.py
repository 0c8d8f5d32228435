"""``ADFQCallback``: add ADFQ-ViT post-training quantization to any Lightning Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..api import prepare
from ..config import ADFQConfig
from ..models import RandomWeightsWarning, create_model
from ..modules import is_calibrated, is_converted
from ..recipe import display_name, model_recipe
from .driver import ReconstructionDriver
from .progress import CalibrationProgress
from .strategies import check_strategy


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
        collective_timeout: under DDP, seconds a collective of the calibration waits for the other ranks before the
            run stops with an error (None: the process group's own timeout, 30 minutes unless the strategy sets
            one). Lightning's own collectives keep the strategy's: ``DDPStrategy(timeout=timedelta(minutes=2))``.
    """

    def __init__(self, config: Optional[ADFQConfig] = None, model_attr: Optional[str] = None,
                 calib_dataloader: Optional[Any] = None, num_calib: int = 1024,
                 collective_timeout: Optional[float] = 120.0) -> None:
        self.driver = ReconstructionDriver(config or ADFQConfig(), collective_timeout)
        self.model_attr = model_attr
        self.calib_dataloader = calib_dataloader
        self.num_calib = num_calib
        self._model: Optional[dict] = None  # how to build the quantized model again, saved with the checkpoint

    @property
    def config(self) -> ADFQConfig:
        return self.driver.config

    @property
    def stages(self) -> list:
        """The per-module results of the calibration this callback ran (empty before it, or after a restore)."""
        return self.driver.stages

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from .module import ADFQModule

        if isinstance(pl_module, ADFQModule):
            raise ValueError("ADFQCallback quantizes your own LightningModule; ADFQModule quantizes itself: remove "
                             "ADFQCallback from the Trainer's callbacks (its recipe is ADFQModule's config).")
        check_strategy(trainer.strategy)
        if sum(isinstance(c, ADFQCallback) for c in trainer.callbacks) > 1:
            raise ValueError("this Trainer has more than one ADFQCallback: a model is quantized once, keep one.")
        model = find_vit(pl_module, self.model_attr)
        if not (is_converted(model) and is_calibrated(model)):
            self.driver.prepare(model, trainer, self.calib_dataloader, self.num_calib)
        recipe = model_recipe(model)
        prefix = next(name for name, m in pl_module.named_modules() if m is model)
        self._model = {"architecture": recipe.architecture if recipe else None,
                       "model_kwargs": recipe.model_kwargs if recipe else {},
                       "prefix": f"{prefix}." if prefix else ""}

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
                warnings.warn(f"ADFQCallback: num_calib={self.num_calib} but the calibration loader yields only "
                              f"{engine.num_samples} images; calibrating on those. Give more images or lower "
                              "num_calib to silence this.", stacklevel=2)
            self.driver.announce_budget(trainer, engine, "ADFQCallback")
            progress = CalibrationProgress(trainer, engine)

            def on_stage(stage, terms) -> None:
                progress.on_stage(stage)
                self.driver.announce_eta(trainer, engine, stage)
                self.driver.log_stage(trainer.loggers, stage, terms, engine.progress()[0])

            try:
                engine.run(log=progress.log, log_every=10, on_stage=on_stage)
            finally:
                progress.close()
            model.train(training)
        self.driver.finish(trainer, display_name(model))

    def state_dict(self) -> dict[str, Any]:
        """The recipe, and how to build the quantized model again (what ``adfq-vit-export`` and
        :func:`load_quantized_vit` read)."""
        return {"config": self.config.to_dict(), **({"model": self._model} if self._model else {})}

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
    state = callback_state(checkpoint, checkpoint_path)
    with warnings.catch_warnings():  # the quantizer entries, loaded below once the modules are swapped
        warnings.filterwarnings("ignore", message="Found keys that are not in the model state dict")
        module = module_cls.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    prepare(find_vit(module, model_attr), ADFQConfig(**state["config"]))
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def callback_state(checkpoint: dict, checkpoint_path: Union[str, Path]) -> dict:
    """The ADFQCallback entry of a loaded Lightning checkpoint; a ValueError naming the fix if it has none."""
    states = [s for key, s in checkpoint.get("callbacks", {}).items() if key.split("{")[0] == ADFQCallback.__qualname__]
    if not states:
        raise ValueError(f"{checkpoint_path} holds no ADFQCallback state: it was not saved by a Trainer with "
                         "ADFQCallback (for an ADFQModule checkpoint use ADFQModule.load_from_checkpoint).")
    return states[0]


def load_quantized_vit(checkpoint_path: Union[str, Path]) -> nn.Module:
    """The quantized timm model of an :class:`ADFQCallback` checkpoint, without your LightningModule class.

    The checkpoint names the model's architecture and constructor arguments; the model is built from them, its
    modules swapped with the stored recipe, and its entries of the checkpoint loaded. Checkpoints written before
    the callback stored the architecture need your class: :func:`load_quantized_checkpoint`.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = callback_state(checkpoint, checkpoint_path)
    built = state.get("model") or {}
    if not built.get("architecture"):
        raise ValueError(f"{checkpoint_path} does not say which model it holds: reload it with your module class, "
                         "load_quantized_checkpoint(MyModule, path), and export its model with "
                         "adfq_lightning.export.export_quantized(module.<model attribute>, path).")
    with warnings.catch_warnings():  # every weight comes from the checkpoint
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_model(built["architecture"], pretrained=False, **built["model_kwargs"])
    prepare(model, ADFQConfig(**state["config"]))
    prefix = built["prefix"]
    model.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return model.eval()
