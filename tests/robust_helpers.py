"""Helpers for tests/test_robustness.py that a CLI subprocess imports too (``PYTHONPATH=tests``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

#: A tiny timm ViT (ImageNet ViT-Tiny class, 32x32 input, one block: 4 reconstruction stages).
TINY_TIMM_VIT = {
    "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10,
    "pretrained_cfg_overlay": {"input_size": [3, 32, 32]},
}


class RandomImages(L.LightningDataModule):
    """``num`` fixed random 32x32 images (same seed, same images), as calibration and validation sets."""

    def __init__(self, num: int = 8, batch_size: int = 4, seed: int = 1, data_config: Optional[dict] = None) -> None:
        super().__init__()
        self.num, self.batch_size, self.seed = num, batch_size, seed

    def _loader(self) -> DataLoader:
        x = torch.randn(self.num, 3, 32, 32, generator=torch.Generator().manual_seed(self.seed))
        y = torch.arange(self.num) % 10
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


class PauseAt(Callback):
    """Stop making progress once ``last.ckpt`` holds engine state (stage, iteration), and say so in ``ready``.

    It waits at the start of the next training batch, i.e. after ModelCheckpoint has written the checkpoint of
    the previous one, so the test can SIGKILL the process knowing exactly what the checkpoint holds.
    """

    def __init__(self, stage: int, iteration: int, ready: str) -> None:
        self.target, self.ready, self.saved = (stage, iteration), ready, None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        engine = pl_module.engine  # callbacks run before the module's own on_save_checkpoint adds its state
        self.saved = None if engine is None else (engine.stage, engine.iteration)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved == self.target:
            Path(self.ready).write_text(json.dumps({"pid": os.getpid(), "global_step": trainer.global_step}))
            while True:  # wait for SIGKILL
                time.sleep(0.1)


class SaveFinalState(Callback):
    """Write the quantized model's state_dict when fit ends (what the tests compare bit for bit)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.model.state_dict(), self.path)
