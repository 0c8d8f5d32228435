"""``ADFQModule``: ASMO reconstruction driven by Lightning's training loop, plus Top-1/Top-5 evaluation."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Optional

import lightning.pytorch as pl
import timm.data
import torch
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.classification import MulticlassAccuracy

from ..api import prepare
from ..config import ADFQConfig
from ..models import create_model
from ..modules import is_calibrated
from ..quantizers import set_quantization
from ..reconstruction import Reconstructor, Stage, make_optimizer
from .driver import ReconstructionDriver
from .preemption import PreemptionHandler
from .sharding import global_positions
from .strategies import check_strategy

log = logging.getLogger(__name__)


class ADFQModule(pl.LightningModule):
    """Quantize a timm ViT/DeiT/Swin with ADFQ-ViT as a ``fit``; evaluate it with ``validate``/``test``.

    ``fit`` runs the reconstruction stages (one per attention/MLP/patch-embed/head module) as training
    steps under manual optimization: each training step does ``iters_per_step`` reconstruction iterations,
    each iteration one ``optimizer.step()`` (so ``global_step`` counts iterations). The calibration images
    come from the datamodule's ``calib_dataloader()`` (``train_dataloader()`` if it has none); the training
    batches themselves carry no data (see :class:`~adfq_lightning.lightning.datamodules.ReconstructionSteps`).

    Args:
        model: a reference CIFAR-10 model (``vit_cifar``, ``deit_cifar``, ``swin_cifar``, or a ``*_outliers``
            stress variant) or a timm model name.
        pretrained: load published weights (the shipped fp16 weights for the reference models).
        checkpoint_path: a local checkpoint file to load instead (timm's loader: a state_dict, or one under
            ``model``/``state_dict``/``state_dict_ema``, DDP ``module.`` prefixes stripped).
        model_kwargs: extra ``timm.create_model`` arguments (``num_classes``, ``img_size``...).
        config: the quantization recipe (an ADFQConfig; a dict of its fields is accepted too, as checkpoints store it).
            Typed as ADFQConfig only so that the CLI rejects unknown keys instead of passing them on in a dict.
        iters_per_step: reconstruction iterations per training step.
        collective_timeout: under DDP, seconds a collective of the calibration waits for the other ranks before the
            run stops with an error naming the resume command (a rank that died stops the others at once); the
            CLI gives Lightning's own process group the same timeout. None: the process group's own (30 minutes
            by default).

    A requeue or termination signal (SIGUSR1, or the SLURM requeue signal, and SIGTERM) stops ``fit`` at the end of
    the current training step with a checkpoint on every rank alike (:mod:`.preemption`).
    """

    def __init__(self, model: str = "vit_cifar", pretrained: bool = True, checkpoint_path: Optional[str] = None,
                 model_kwargs: Optional[dict[str, Any]] = None, config: Optional[ADFQConfig] = None,
                 iters_per_step: int = 10, collective_timeout: Optional[float] = 120.0) -> None:
        super().__init__()
        self.automatic_optimization = False
        config = ADFQConfig(**config) if isinstance(config, dict) else (config or ADFQConfig())
        if iters_per_step < 1:
            raise ValueError(f"iters_per_step={iters_per_step!r} must be a positive integer.")
        # the recipe as plain types (the checkpoint loads with weights_only, loggers show the bit widths)
        self.save_hyperparameters({"model": model, "pretrained": pretrained, "checkpoint_path": checkpoint_path,
                                   "model_kwargs": model_kwargs, "config": config.to_dict(),
                                   "iters_per_step": iters_per_step, "collective_timeout": collective_timeout})
        self.model = create_model(model, pretrained=pretrained, checkpoint_path=checkpoint_path, **(model_kwargs or {}))
        classes = self.model.num_classes
        self.top1 = MulticlassAccuracy(classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(classes, top_k=min(5, classes), average="micro")
        # logged as torchmetrics objects, so Lightning knows they are global under DDP and resets them each epoch
        self.top1_percent, self.top5_percent = self.top1 * 100, self.top5 * 100
        self.driver = ReconstructionDriver(config, collective_timeout)
        self.preemption = PreemptionHandler()
        self.eval_tag = "quant"
        self.evaluation: dict[str, dict[str, float]] = {}

    @property
    def data_config(self) -> dict:
        """timm's data config of the model (input size, mean/std, interpolation), for the datamodule.

        The input size is the built model's: ``model_kwargs: {img_size: 32}`` changes the model but not the
        pretrained config timm resolves from."""
        config = timm.data.resolve_data_config(model=self.model)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None and tuple(config["input_size"][1:]) != tuple(img_size):
            config["input_size"] = (config["input_size"][0], *img_size)
            config["crop_pct"] = 1.0  # resize to the model's size, no crop margin
        return config

    @property
    def config(self) -> ADFQConfig:
        """The recipe; under a ``bit_budget``, once ``fit`` allocated the widths, with them as ``overrides``."""
        return self.driver.config

    @property
    def engine(self) -> Optional[Reconstructor]:
        """The reconstruction engine of the running (or finished) ``fit``; None before it."""
        return self.driver.engine

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)
        if self.config.bit_budget is not None and stage != "fit":
            return  # evaluating: the checkpoint brings the widths fit allocated (on_load_checkpoint)
        self.driver.prepare(self.model, self.trainer)
        self.hparams["config"] = self.config.to_dict()  # checkpoints and hparams.yaml keep the allocated widths

    def configure_optimizers(self):
        return make_optimizer(self.model, self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- reconstruction as training -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Lightning warns about eval-mode modules just before on_train_start; PTQ wants eval mode (no dropout or
        # drop-path), which on_train_start sets.
        self.model.train()

    def on_train_start(self) -> None:
        self.driver.announce_budget(self.trainer, self.driver.start(self.trainer, self.model), "ADFQModule")
        self.preemption.install(self.trainer)

    def _backward(self, loss: torch.Tensor) -> None:
        """``manual_backward`` without DDP's gradient all-reduce: the engine sums the active stage's gradients
        over ranks itself (DistributedDataParallel tracks none of the quantizer parameters)."""
        wrapped = self.trainer.strategy.model
        with wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) else nullcontext():
            self.manual_backward(loss)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        engine = self.engine

        def on_stage(stage: Stage, terms: Optional[dict]) -> None:
            self.driver.log_stage(self.loggers, stage, terms, self.global_step)

        last = engine.advance(self.optimizers(), self.hparams.iters_per_step, backward=self._backward,
                              on_stage=on_stage)
        if last is not None:
            terms = dict(last)
            self.log("recon/loss", terms.pop("loss"), prog_bar=True)
            # "step" is the x-axis loggers use: iterations, as in log_stage, so every logger's steps only grow
            self.log_dict({f"recon/{k}": v for k, v in terms.items()} | {"step": float(self.global_step)})
        if engine.done:
            self.trainer.should_stop = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the callbacks' hook (ModelCheckpoint's save): the state a preemption checkpoint holds is theirs
        if not self.engine.done:
            self.preemption.stop_if_signalled(self.trainer)

    def on_train_end(self) -> None:
        """The finished model goes into ``last.ckpt``: Lightning's ModelCheckpoint writes its last checkpoint at
        the end of fit only when it wrote none during it, which leaves an unfinished one when the run's step
        count is not a multiple of ``every_n_train_steps``."""
        for callback in self.trainer.checkpoint_callbacks:
            if getattr(callback, "save_last", False) and callback.last_model_path:
                self.trainer.save_checkpoint(callback.last_model_path, weights_only=False)
        self.driver.finish(self.trainer, self.hparams.model, self.evaluation)
        self.preemption.finished(self.trainer)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.engine is not None:
            checkpoint["adfq_engine"] = self.engine.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("config")
        self.driver.adopt_allocation(saved)
        self.driver.check_recipe(saved, "Evaluate it with the config it was made with (its hparams.yaml), or run fit "
                                 "again.")
        prepare(self.model, self.config)  # load_from_checkpoint builds a float model: swap modules first
        self.driver.resume_state = checkpoint.get("adfq_engine")

    # -- evaluation ------------------------------------------------------------------------------------------
    def _eval_epoch_start(self, dataloader) -> None:
        if self.config.bit_budget is not None:  # neither fit nor a checkpoint chose the widths
            raise ValueError("this config has a bit_budget, whose widths fit allocates: evaluate the checkpoint of "
                             "that fit (validate/test --ckpt_path <its last.ckpt>), or run fit first.")
        # Padding duplicates a DistributedSampler adds are not counted, so DDP accuracy equals one process's.
        self._batch_size = dataloader.batch_size
        self._real = global_positions(dataloader)[1].to(self.device)

    def _eval_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        start = batch_idx * self._batch_size
        keep = self._real[start : start + x.shape[0]]
        if keep.any():  # a rank's last batch may be padding only (torchmetrics refuses an empty update)
            self.top1.update(logits[keep], y[keep])
            self.top5.update(logits[keep], y[keep])

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start(self.trainer.val_dataloaders)

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start(self.trainer.test_dataloaders)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_predict_start(self) -> None:
        if not is_calibrated(self.model):
            raise RuntimeError("predict needs a quantized model: pass the checkpoint of a finished fit "
                               "(adfq-vit predict --config ... --ckpt_path runs/.../checkpoints/last.ckpt).")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Class probabilities and the predicted class of the quantized model for each image (and its label)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self.model(x).softmax(dim=-1)
        out = {"probs": probs, "pred": probs.argmax(dim=-1)}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out["labels"] = batch[1]
        return out

    def _eval_epoch_end(self, split: str) -> None:
        top1, top5 = self.top1.compute(), self.top5.compute()
        prefix = f"{split}_fp" if self.eval_tag == "fp" else split
        self.log_dict({f"{prefix}/top1": self.top1_percent, f"{prefix}/top5": self.top5_percent})
        self.evaluation[prefix] = {"top1": float(top1) * 100, "top5": float(top5) * 100}
        self._write_report()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def set_float_mode(self, enabled: bool) -> None:
        """Evaluate the full-precision model (``True``) or the quantized one (``False``)."""
        set_quantization(self.model, not enabled)
        self.eval_tag = "fp" if enabled else "quant"

    def _write_report(self) -> None:
        """Rank 0 writes the report; every rank must call this (``trainer.log_dir`` is a broadcast under DDP)."""
        if not self.trainer.sanity_checking:
            self.driver.write_report(self.trainer, self.hparams.model, self.evaluation)
