"""Train a reference model of ``adfq_lightning.zoo`` on CIFAR-10 and export its fp16 weights.

    python recipes/train_reference.py --model vit_cifar --epochs 12

Trains on the 45,000-image training part of the deterministic split (``adfq_lightning.data``) and
validates on the 5,000 held-out images.  A killed run resumes from ``<run-dir>/<model>/checkpoints/
last.ckpt`` when started again with the same arguments.  After every validation epoch (so a usable
asset exists even if the run is cut short) it writes

* ``adfq_lightning/assets/<model>.pt``: fp16 ``state_dict`` (``torch.load(..., weights_only=True)``),
* ``recipes/results/<model>.json``: epochs, wall time and validation top-1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without installing

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from adfq_lightning.data import (  # noqa: E402
    DEFAULT_ARCHIVE, TensorImageDataset, cifar10_eval_transform, cifar10_train_transform,
    decode_image_folder, split_indices,
)
from adfq_lightning.zoo import REFERENCE_MODELS, create_reference_model  # noqa: E402


class ReferenceTrainer(L.LightningModule):
    """Cross-entropy training with AdamW and a per-step linear warm-up + cosine schedule.

    For ``VisionTransformerDistilled`` (``deit_cifar``) both the class and the distillation head
    are trained on the hard labels (no teacher exists for CIFAR-10); inference averages them.
    """

    def __init__(self, model_name: str, lr: float, weight_decay: float, warmup_epochs: float,
                 label_smoothing: float, asset_path: Path, summary_path: Path):
        super().__init__()
        self.save_hyperparameters(ignore=["asset_path", "summary_path"])
        self.model = create_reference_model(model_name)
        if hasattr(self.model, "set_distilled_training"):
            self.model.set_distilled_training(True)
        self.val_top1 = MulticlassAccuracy(num_classes=self.model.num_classes, average="micro")
        self.asset_path, self.summary_path = asset_path, summary_path
        self.train_seconds = 0.0  # wall time, accumulated across resumed runs via the checkpoint
        self.best_top1 = 0.0
        self._clock = 0.0

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
        if not self.trainer.sanity_checking:
            now = time.perf_counter()
            self.train_seconds, self._clock = self.train_seconds + now - self._clock, now
            self.best_top1 = max(self.best_top1, top1)
            self.export(top1)
            print(f"[{self.hparams.model_name}] epoch {self.current_epoch + 1}/{self.trainer.max_epochs} "
                  f"val top-1 {top1:.4f}  train time {self.train_seconds / 60:.1f} min", flush=True)

    def export(self, top1: float) -> None:
        """Write the fp16 weights and the JSON summary for the current epoch."""
        self.asset_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().to("cpu", torch.float16) for k, v in self.model.state_dict().items()},
                   self.asset_path)
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self.summary_path.write_text(json.dumps({
            "model": self.hparams.model_name,
            "epochs_completed": self.current_epoch + 1,
            "max_epochs": self.trainer.max_epochs,
            "train_wall_time_s": round(self.train_seconds, 1),
            "val_top1": round(top1, 4),
            "best_val_top1": round(self.best_top1, 4),
            "val_images": len(self.trainer.datamodule.val_set),
            "hparams": dict(self.hparams),
            "torch_threads": torch.get_num_threads(),
        }, indent=2) + "\n")

    def on_save_checkpoint(self, checkpoint):
        checkpoint["train_seconds"] = self.train_seconds
        checkpoint["best_top1"] = self.best_top1

    def on_load_checkpoint(self, checkpoint):
        self.train_seconds = checkpoint.get("train_seconds", 0.0)
        self.best_top1 = checkpoint.get("best_top1", 0.0)

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]  # norms, biases, tokens
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, int(total * self.hparams.warmup_epochs / self.trainer.max_epochs))
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
        ], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CIFAR10TrainData(L.LightningDataModule):
    """The 45,000 / 5,000 split of the CIFAR-10 archive, augmented for training."""

    def __init__(self, archive: Path, batch_size: int, num_workers: int):
        super().__init__()
        self.archive, self.batch_size, self.num_workers = archive, batch_size, num_workers

    def setup(self, stage: str | None = None):
        data = decode_image_folder(self.archive)
        train_idx, val_idx = split_indices(data.labels)
        self.train_set = TensorImageDataset(data.images[train_idx], data.labels[train_idx],
                                            cifar10_train_transform())
        self.val_set = TensorImageDataset(data.images[val_idx], data.labels[val_idx],
                                          cifar10_eval_transform())

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--num-workers", type=int, default=0)
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
        args.model, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, asset_path=args.asset_dir / f"{args.model}.pt",
        summary_path=args.results_dir / f"{args.model}.json")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, default_root_dir=run_dir,
        logger=CSVLogger(run_dir, name="csv"),
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_epochs=1),
                   LearningRateMonitor("step")],
        log_every_n_steps=50, num_sanity_val_steps=0,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=CIFAR10TrainData(args.archive, args.batch_size, args.num_workers),
                ckpt_path=last if last.is_file() else None)


if __name__ == "__main__":
    main()
