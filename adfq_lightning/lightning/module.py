"""``ADFQModule``: ASMO reconstruction driven by Lightning's training loop, plus Top-1/Top-5 evaluation."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import timm.data
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torchmetrics.classification import MulticlassAccuracy

from ..api import prepare
from ..config import ADFQConfig
from ..reconstruction.engine import Reconstructor, make_optimizers, set_quantization
from ..zoo import create_model
from .callback import ADFQCallback
from .progress import StageProgressBar
from .report import write_run_report
from .sharding import global_positions, shard_from_loader


class ADFQModule(pl.LightningModule):
    """Quantize a timm ViT/DeiT/Swin with ADFQ-ViT as a ``fit``; evaluate it with ``validate``/``test``.

    ``fit`` runs the reconstruction stages (one per attention/MLP/patch-embed/head module) as training
    steps under manual optimization, each step doing ``iters_per_step`` iterations of the current stage;
    only that stage's rounding variables and step sizes receive gradients. The quantized modules are
    injected by :class:`ADFQCallback` in ``setup``; calibration never runs under inference mode.

    Args:
        model: a reference CIFAR-10 model (``vit_cifar``, ``deit_cifar``, ``swin_cifar``) or a timm model name.
        pretrained: load published weights (the shipped fp16 weights for the reference models).
        checkpoint_path: a local state_dict to load instead.
        model_kwargs: extra ``timm.create_model`` arguments (``num_classes``, ``img_size``...).
        config: the quantization recipe (an ADFQConfig; a dict of its fields is accepted too, as checkpoints store it).
            Typed as ADFQConfig only so that the CLI rejects unknown keys instead of passing them on in a dict.
        iters_per_step: reconstruction iterations per training step.
    """

    def __init__(self, model: str = "vit_cifar", pretrained: bool = True, checkpoint_path: Optional[str] = None,
                 model_kwargs: Optional[dict[str, Any]] = None, config: Optional[ADFQConfig] = None,
                 iters_per_step: int = 10) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.config = ADFQConfig(**config) if isinstance(config, dict) else (config or ADFQConfig())
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = self.config.to_dict()  # plain types: the checkpoint loads with weights_only
        self.model = create_model(model, pretrained=pretrained, checkpoint_path=checkpoint_path, **(model_kwargs or {}))
        classes = self.model.num_classes
        self.top1 = MulticlassAccuracy(classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(classes, top_k=min(5, classes), average="micro")
        self.engine: Optional[Reconstructor] = None
        self._engine_state: Optional[dict] = None
        self.eval_tag = "quant"
        self.evaluation: dict[str, dict[str, float]] = {}

    @property
    def data_config(self) -> dict:
        """timm's data config of the model (input size, mean/std, interpolation), for the datamodule."""
        return timm.data.resolve_data_config(model=self.model)

    def configure_callbacks(self):
        callbacks = [ADFQCallback(self.config, model_attr="model", calibrate=False)]
        if isinstance(self.trainer.progress_bar_callback, TQDMProgressBar):
            callbacks.append(StageProgressBar())  # replaces the default bar
        return callbacks

    def setup(self, stage: str) -> None:
        # Under DDP, Lightning wraps this module in DistributedDataParallel for ``fit``, but reconstruction never
        # uses DDP's reducer: the engine calls ``loss.backward()`` itself (not ``manual_backward``, so the reducer
        # is never prepared) and all-reduces the active stage's gradients in ``Reconstructor._sync_gradients``.
        # The reducer still holds a gradient accumulator for every parameter it registers, and a quantizer's step
        # size changes shape when it is calibrated (scalar -> per token/channel, through ``.data``): through such a
        # stale accumulator autograd silently sums the new gradient back to the old shape. DDP would also
        # broadcast every buffer from rank 0 in each forward, a collective that hangs when ranks run different
        # numbers of steps. So DDP is told to leave quantizer state and buffers alone; every rank computes them
        # identically (quantizers are initialised on gathered data, gradients are summed over ranks).
        from ..quantizers import Quantizer

        ignore = [f"model.{name}" for name, _ in self.model.named_buffers()]
        for prefix, module in self.model.named_modules():
            if isinstance(module, Quantizer):
                ignore += [f"model.{prefix}.{name}" for name, _ in module.named_parameters()]
        self._ddp_params_and_buffers_to_ignore = sorted(set(ignore))

    def configure_optimizers(self):
        return list(make_optimizers(self.model, self.config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- reconstruction as training -----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        images, ids, n = shard_from_loader(self.trainer.train_dataloader)
        self.model.eval()
        self.engine = Reconstructor(self.model, self.config, images, ids, n, device=self.device)
        if self._engine_state is not None:
            self.engine.load_state_dict(self._engine_state)

    def on_train_epoch_start(self) -> None:
        self.model.eval()  # PTQ: dropout and drop-path stay off while reconstructing

    def training_step(self, batch: Any, batch_idx: int) -> None:
        engine = self.engine
        wrapped = self.optimizers()
        optimizers = [opt.optimizer for opt in wrapped]
        # One optimizer step in Lightning's accounting per training step, whatever the engine did: the engine
        # steps the raw optimizers, which Lightning does not count, so trainer.global_step (and with it
        # ModelCheckpoint(every_n_train_steps=...), max_steps, logging) would otherwise stay at 0.
        wrapped[0]._on_before_step()
        wrapped[0]._on_after_step()
        terms = None
        for _ in range(self.hparams.iters_per_step):
            if engine.done:
                break
            if not engine.stage_ready:
                engine.prepare_stage()
            if engine.stage_complete():
                self._log_stage(engine.finish_stage(optimizers))
                continue
            terms = engine.step(optimizers)
        if terms is not None:
            self.log_dict({f"recon/{k}": v for k, v in terms.items()}, prog_bar=True, logger=False)
            name = engine.current.name if not engine.done else "done"
            self.log_dict({f"recon/{name}/{k}": v for k, v in terms.items() if k != "beta"})
        if engine.done:
            self.trainer.should_stop = True

    def _log_stage(self, stage) -> None:
        self.log_dict({f"recon/{stage.name}/{k}": float(stage.stats[k]) for k in ("init_error", "final_error")})

    def on_train_end(self) -> None:
        self._write_report()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.engine is not None:
            checkpoint["adfq_engine"] = self.engine.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        prepare(self.model, self.config)  # load_from_checkpoint builds a float model: swap modules first
        self._engine_state = checkpoint.get("adfq_engine")

    # -- evaluation ------------------------------------------------------------------------------------------
    def _eval_epoch_start(self, dataloader) -> None:
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

    def _eval_epoch_end(self, split: str) -> None:
        top1, top5 = self.top1.compute(), self.top5.compute()
        prefix = f"{split}_fp" if self.eval_tag == "fp" else split
        self.log_dict({f"{prefix}/top1": top1 * 100, f"{prefix}/top5": top5 * 100})
        self.evaluation[prefix] = {"top1": float(top1) * 100, "top5": float(top5) * 100}
        self.top1.reset()
        self.top5.reset()
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
        if self._trainer is None or self.trainer.sanity_checking:
            return
        stages = self.engine.stages if self.engine is not None else []
        write_run_report(self.trainer, self.config, stages, self.hparams.model, self.evaluation)
