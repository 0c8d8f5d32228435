"""Quantize the ViT inside *your own* LightningModule by adding one callback to its Trainer, then reload and
export it: the whole own-project path.

    python examples/quantize_my_lightning_module.py

Nothing here is specific to adfq-lightning except ``ADFQCallback`` and the reload/export calls: the classifier
below stands for the LightningModule you already train with. The steps:

1. ``validate`` the float model (no callback): the accuracy to compare with;
2. ``validate`` with ``ADFQCallback``: it swaps the timm ViT for a W4A4 ADFQ-quantized one in ``setup``,
   calibrates and reconstructs it when ``validate`` starts (on the datamodule's ``calib_dataloader()``), prints
   the cost up front and a summary at the end, writes ``adfq_report.json``, and reports the quantized accuracy;
3. save the Trainer's checkpoint and reload it outside a Trainer with ``load_quantized_checkpoint``;
4. export the quantized ViT with ``export_quantized(model, path)`` (the model carries its recipe) and load the
   export back with ``load_exported``: it must give the reloaded model's outputs.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from pathlib import Path

from adfq_lightning import ADFQCallback, ADFQConfig
from adfq_lightning.export import export_quantized, load_exported
from adfq_lightning.lightning import CIFAR10DataModule, load_quantized_checkpoint
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
    """Run the five steps; returns the quantized accuracy."""
    pl.seed_everything(0)
    data = CIFAR10DataModule(num_calib=num_calib)
    common = dict(accelerator="cpu", devices=1, logger=False, limit_val_batches=limit_val_batches,
                  default_root_dir=root, enable_model_summary=False)
    module = MyClassifier()
    fp = pl.Trainer(**common).validate(module, datamodule=data, verbose=False)[0]["val_acc"]

    # 14 modules x `iters` iterations: the callback says so when it starts, and how long the rest takes after one
    config = ADFQConfig(w_bits=4, a_bits=4, iters=iters)
    trainer = pl.Trainer(callbacks=[ADFQCallback(config, num_calib=num_calib)], **common)
    quantized = trainer.validate(module, datamodule=data, verbose=False)[0]["val_acc"]
    print(f"FP accuracy {fp:.4f} | W4A4 accuracy {quantized:.4f}")

    checkpoint = Path(root) / "quantized.ckpt"
    trainer.save_checkpoint(checkpoint)
    reloaded = load_quantized_checkpoint(MyClassifier, checkpoint)  # the recipe comes from the checkpoint

    artifact = export_quantized(reloaded.backbone, Path(root) / "vit_w4a4.safetensors")
    deployed = load_exported(artifact)  # built from the file's header: no MyClassifier, no calibration
    data.setup("validate")
    images = next(iter(data.val_dataloader()))[0][:16]
    with torch.no_grad():
        agree = (deployed(images).argmax(1) == reloaded(images).argmax(1)).float().mean().item()
    if agree < 1.0:
        raise RuntimeError(f"the export disagrees with the reloaded model on {1 - agree:.0%} of the images")
    print(f"exported {artifact}; the export agrees with the reloaded model")
    return quantized


if __name__ == "__main__":
    main()
