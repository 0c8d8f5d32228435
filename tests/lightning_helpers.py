"""A user's own LightningModule (not defined by the package), importable by a fresh test subprocess too."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from conftest import build_tiny


class UserClassifier(pl.LightningModule):
    """A LightningModule the package does not define: a user's own Swin classifier."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_tiny("swin")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
