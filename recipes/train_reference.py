"""Train a reference model of ``adfq_lightning.zoo`` on CIFAR-10 and export its fp16 weights.

    python recipes/train_reference.py --model vit_cifar --epochs 100

The recipe is what is known to work for small ViTs trained from scratch on CIFAR: AdamW, a per-step
linear warm-up then cosine decay, label smoothing, stochastic depth, random crop + flip + timm's
RandAugment, gradient clipping, bf16 autocast on a GPU.  It trains on the 45,000-image training part
of the deterministic split (``adfq_lightning.data``) and validates on the 5,000 held-out images.

``--time-budget S`` measures the second epoch (the first includes start-up) and then fixes the number
of epochs to what fits in ``S`` seconds (at most ``--epochs``); the cosine schedule is stretched to
that count, and the count is logged and saved, so ``--epochs <that count>`` reproduces the run.

``--init-from DIR`` starts from ``DIR/<model>.pt`` (fp16 weights of an earlier run) instead of a
random initialisation: a second cosine cycle (warm restart) continues a run whose schedule ended.

A killed run resumes from ``<run-dir>/<model>/checkpoints/last.ckpt`` when started again with the
same arguments.  After every validation epoch (so a usable asset exists even if the run is cut
short) it writes

* ``adfq_lightning/assets/<model>.pt``: fp16 ``state_dict`` (``torch.load(..., weights_only=True)``),
* ``recipes/results/<model>.json``: epochs, wall time, validation top-1 and the hyperparameters.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without installing

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from timm.data import rand_augment_transform  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from adfq_lightning.data import (  # noqa: E402
    CIFAR10_MEAN, DEFAULT_ARCHIVE, TensorImageDataset, cifar10_eval_transform, decode_image_folder, split_indices,
)
from adfq_lightning.atomic import atomic_torch_save, atomic_write  # noqa: E402
from adfq_lightning.zoo import REFERENCE_MODELS, create_reference_model  # noqa: E402


def cifar10_augment_transform(randaugment: str):
    """uint8 tensor -> random crop (pad 4) + flip + timm RandAugment on PIL -> normalised float tensor."""
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if randaugment:
        mean = tuple(round(255 * m) for m in CIFAR10_MEAN)
        steps.append(rand_augment_transform(randaugment, {"translate_const": 10, "img_mean": mean}))
    pil_augment, to_float = T.Compose(steps), cifar10_eval_transform()
    return lambda image: to_float(TF.pil_to_tensor(pil_augment(TF.to_pil_image(image))))


class ReferenceTrainer(L.LightningModule):
    """Cross-entropy training with AdamW, linear warm-up and cosine decay per step.

    For ``VisionTransformerDistilled`` (``deit_cifar``) both the class and the distillation head
    are trained on the hard labels (the ground truth stands in for a teacher); inference averages them.
    """

    def __init__(self, model_name: str, lr: float, min_lr: float, weight_decay: float, warmup_epochs: int,
                 label_smoothing: float, drop_path: float, randaugment: str, batch_size: int,
                 asset_path: Path, summary_path: Path, time_budget: float | None = None,
                 init_from: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["asset_path", "summary_path", "time_budget"])
        self.model = create_reference_model(model_name, drop_path_rate=drop_path).train()  # zoo returns eval()
        if init_from:
            state = torch.load(Path(init_from) / f"{model_name}.pt", map_location="cpu", weights_only=True)
            self.model.load_state_dict({k: v.float() for k, v in state.items()})
        if hasattr(self.model, "set_distilled_training"):
            self.model.set_distilled_training(True)
        self.val_top1 = MulticlassAccuracy(num_classes=self.model.num_classes, average="micro")
        self.asset_path, self.summary_path, self.time_budget = asset_path, summary_path, time_budget
        self.train_seconds = 0.0  # wall time, accumulated across resumed runs via the checkpoint
        self.best_top1 = 0.0
        self.total_epochs = 0  # fixed in on_fit_start (or after epoch 2 under a time budget)
        self._clock = 0.0

    # -- schedule -------------------------------------------------------------------------------------------
    def on_fit_start(self):
        if not self.total_epochs:
            self.total_epochs = self.trainer.max_epochs

    def lr_factor(self, step: int) -> float:
        steps_per_epoch = self.trainer.num_training_batches
        warmup = self.hparams.warmup_epochs * steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_epochs * steps_per_epoch - warmup))
        floor = self.hparams.min_lr / self.hparams.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]  # norms, biases, tokens
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- steps ----------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, labels = batch
        outputs = self.model(images)
        heads = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = sum(F.cross_entropy(o, labels, label_smoothing=self.hparams.label_smoothing)
                   for o in heads) / len(heads)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.val_top1.update(self.model(images), labels)

    def on_train_start(self):
        self._clock = time.perf_counter()

    def on_validation_epoch_end(self):
        top1 = float(self.val_top1.compute())
        self.val_top1.reset()
        self.log("val/top1", top1, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        now = time.perf_counter()
        epoch_seconds = now - self._clock
        self.train_seconds, self._clock = self.train_seconds + epoch_seconds, now
        if self.time_budget and self.current_epoch == 1 and self.trainer.ckpt_path is None:
            fits = 2 + int((self.time_budget - self.train_seconds) // epoch_seconds)
            self.total_epochs = max(self.hparams.warmup_epochs + 1, min(self.trainer.max_epochs, fits))
        self.best_top1 = max(self.best_top1, top1)
        self.export(top1)
        print(f"[{self.hparams.model_name}] epoch {self.current_epoch + 1}/{self.total_epochs} "
              f"val top-1 {top1:.4f}  lr {self.lr_schedulers().get_last_lr()[0]:.2e}  "
              f"train time {self.train_seconds / 60:.1f} min", flush=True)
        if self.current_epoch + 1 >= self.total_epochs:
            self.trainer.should_stop = True

    def export(self, top1: float) -> None:
        """Write the fp16 weights and the JSON summary for the current epoch."""
        atomic_torch_save({k: v.detach().to("cpu", torch.float16) for k, v in self.model.state_dict().items()},
                          self.asset_path)
        atomic_write(self.summary_path, (json.dumps({
            "model": self.hparams.model_name,
            "epochs_completed": self.current_epoch + 1,
            "epochs": self.total_epochs,
            "train_wall_time_s": round(self.train_seconds, 1),
            "val_top1": round(top1, 4),
            "best_val_top1": round(self.best_top1, 4),
            "val_images": len(self.trainer.datamodule.val_set),
            "hparams": dict(self.hparams),
            "accelerator": str(self.device.type),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "precision": str(self.trainer.precision),
            "torch_threads": torch.get_num_threads(),
            "reproduce": f"python recipes/train_reference.py --model {self.hparams.model_name} "
                         f"--epochs {self.total_epochs} --lr {self.hparams.lr} "
                         f"--warmup-epochs {self.hparams.warmup_epochs}"
                         + (f" --init-from {self.hparams.init_from}" if self.hparams.init_from else ""),
        }, indent=2) + "\n").encode())

    def on_save_checkpoint(self, checkpoint):
        checkpoint["train_seconds"] = self.train_seconds
        checkpoint["best_top1"] = self.best_top1
        checkpoint["total_epochs"] = self.total_epochs

    def on_load_checkpoint(self, checkpoint):
        self.train_seconds = checkpoint.get("train_seconds", 0.0)
        self.best_top1 = checkpoint.get("best_top1", 0.0)
        self.total_epochs = checkpoint.get("total_epochs", 0)


class CIFAR10TrainData(L.LightningDataModule):
    """The 45,000 / 5,000 split of the CIFAR-10 archive, augmented for training."""

    def __init__(self, archive: Path, batch_size: int, num_workers: int, randaugment: str):
        super().__init__()
        self.archive, self.batch_size, self.num_workers = archive, batch_size, num_workers
        self.randaugment = randaugment

    def setup(self, stage: str | None = None):
        data = decode_image_folder(self.archive)
        train_idx, val_idx = split_indices(data.labels)
        self.train_set = TensorImageDataset(data.images[train_idx], data.labels[train_idx],
                                            cifar10_augment_transform(self.randaugment))
        self.val_set = TensorImageDataset(data.images[val_idx], data.labels[val_idx], cifar10_eval_transform())

    def _loader(self, dataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size if train else 500, shuffle=train, drop_last=train,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--epochs", type=int, default=100, help="epochs (the most, with --time-budget)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training: the epoch count is fixed after the first epoch")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--min-lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--randaugment", default="rand-m9-n2-mstd0.5",
                        help="timm RandAugment config string; '' for crop + flip only")
    parser.add_argument("--init-from", default=None, help="directory of fp16 weights <model>.pt to start from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "train")
    parser.add_argument("--asset-dir", type=Path, default=REPO / "adfq_lightning" / "assets")
    parser.add_argument("--results-dir", type=Path, default=REPO / "recipes" / "results")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    run_dir = args.run_dir / args.model
    module = ReferenceTrainer(
        args.model, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, drop_path=args.drop_path,
        randaugment=args.randaugment, batch_size=args.batch_size,
        asset_path=args.asset_dir / f"{args.model}.pt", summary_path=args.results_dir / f"{args.model}.json",
        time_budget=args.time_budget, init_from=args.init_from)
    gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_epochs=args.epochs, default_root_dir=run_dir,
        precision="bf16-mixed" if gpu else "32-true", gradient_clip_val=1.0,
        logger=CSVLogger(run_dir, name="csv"),
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_epochs=1),
                   LearningRateMonitor("step")],
        log_every_n_steps=50, num_sanity_val_steps=0, enable_progress_bar=sys.stderr.isatty(),
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    data = CIFAR10TrainData(args.archive, args.batch_size, args.num_workers, args.randaugment)
    trainer.fit(module, datamodule=data, ckpt_path=last if last.is_file() else None)


if __name__ == "__main__":
    main()
