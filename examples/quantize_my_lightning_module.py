"""Quantize the ViT inside *your own* LightningModule by adding one callback to its Trainer.

    python examples/quantize_my_lightning_module.py

Nothing here is specific to adfq-lightning except ``ADFQCallback``: the classifier below stands for the
LightningModule you already train with. The callback swaps its timm ViT for a W4A4 ADFQ-quantized one in
``setup``, calibrates and reconstructs it when ``validate`` starts (on the datamodule's ``calib_dataloader()``:
calibration images with eval transforms), and ``validate`` then reports the quantized accuracy.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from adfq_lightning import ADFQCallback, ADFQConfig
from adfq_lightning.lightning import CIFAR10DataModule
from adfq_lightning.zoo import create_reference_model


class MyClassifier(pl.LightningModule):
    """A user's ordinary image classifier around a timm ViT."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_reference_model("vit_cifar", pretrained=True)
        self.accuracy = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.accuracy.update(self(x), y)
        self.log("val_acc", self.accuracy)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def main(iters: int = 100, num_calib: int = 256, limit_val_batches: float = 1.0, root: str = "runs/example") -> float:
    pl.seed_everything(0)
    config = ADFQConfig(w_bits=4, a_bits=4, iters=iters)
    trainer = pl.Trainer(
        callbacks=[ADFQCallback(config, num_calib=num_calib)],
        accelerator="auto", devices=1, logger=False, limit_val_batches=limit_val_batches, default_root_dir=root,
    )
    results = trainer.validate(MyClassifier(), datamodule=CIFAR10DataModule(num_calib=num_calib))
    return results[0]["val_acc"]


if __name__ == "__main__":
    print(f"W4A4 accuracy: {main():.4f}")
