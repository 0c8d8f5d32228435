"""One process group's side of tests/test_distributed.py: ``python tests/ddp_worker.py OUT DEVICES [PATH]``.

Run once with ``DEVICES=1`` and once with ``DEVICES=2`` (Lightning's own DDP launcher starts the second process
by re-running this script with ``LOCAL_RANK=1``, exactly as ``adfq-vit fit --trainer.devices 2`` does). Every
rank writes what it ended up with to ``OUT/<path>_rank<r>.pt`` for the test to compare:

* ``module``: ``ADFQModule`` fitted by a Trainer (reconstruction as training steps, calibration images sharded
  by Lightning's DistributedSampler), then ``validate`` and ``test`` on a validation set whose size is not a
  multiple of the world size, then ``test(ckpt_path=last.ckpt)`` in a fresh module;
* ``callback``: a user's LightningModule quantized by ``ADFQCallback`` in ``Trainer.validate`` (strided shard
  of an un-sharded calibration loader).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from adfq_lightning import ADFQCallback, ADFQConfig, ADFQModule

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                pretrained_cfg_overlay=dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3))
# 23 calibration and 21 validation images over 2 ranks: DistributedSampler pads each with one duplicate
N_CALIB, N_VAL = 23, 21
CONFIG = dict(iters=4, batch_size=8, init_samples=12)
# batch_size 3 over 2 ranks: some iterations draw no sample of one rank's shard (it still joins the all-reduce);
# bias correction's mean outputs are summed over the ranks' shards too
CALLBACK_CONFIG = dict(iters=4, batch_size=3, init_samples=12, bias_correction=True)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class Data(pl.LightningDataModule):
    def __init__(self, data_config: dict | None = None) -> None:
        super().__init__()
        self.calib = TensorDataset(images(N_CALIB, 3), torch.zeros(N_CALIB, dtype=torch.long))
        # any fixed labels do: Top-1/Top-5 count hits over the 21 images, and counting the padding duplicate (or
        # losing a sample) turns k/21 into j/22 (or j/20), never equal to it for 0 < k < 21
        self.val = TensorDataset(images(N_VAL, 4), torch.arange(N_VAL) % 10)

    def train_dataloader(self):
        return DataLoader(self.calib, batch_size=5)  # 12 per rank (one is padding) in batches of 5, 5, 2

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=5)  # rank 1: 11 samples in batches of 5, 5, 1 (the 1 is padding)

    def test_dataloader(self):
        return self.val_dataloader()


def make_trainer(devices: int, root: Path, **kwargs) -> pl.Trainer:
    strategy = DDPStrategy(timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, default_root_dir=root,
                      max_epochs=-1, num_sanity_val_steps=0, check_val_every_n_epoch=1_000_000,
                      enable_model_summary=False, enable_progress_bar=False, **kwargs)


def probe(model: torch.nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(images(6, 5) if x is None else x)


def run_module(out: Path, devices: int) -> dict:
    torch.manual_seed(0)
    module = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT,
                        config=ADFQConfig(**CONFIG), iters_per_step=3)
    root = out / "module"
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = make_trainer(devices, root, callbacks=[ckpt], logger=pl.loggers.CSVLogger(root, name="logs"))
    data = Data()
    trainer.fit(module, datamodule=data)
    trainer.validate(module, datamodule=data, verbose=False)
    trainer.test(module, datamodule=data, verbose=False)
    reloaded = ADFQModule("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT,
                          config=ADFQConfig(**CONFIG), iters_per_step=3)
    tester = make_trainer(devices, root / "reload", logger=False)
    tester.test(reloaded, datamodule=data, ckpt_path=str(root / "ckpt" / "last.ckpt"), verbose=False)
    return {"state_dict": module.model.state_dict(), "logits": probe(module.model),
            "val_logits": probe(module.model, data.val.tensors[0]), "val_labels": data.val.tensors[1],
            "reloaded_logits": probe(reloaded.model), "evaluation": module.evaluation,
            "reloaded_evaluation": reloaded.evaluation, "log_dir": trainer.log_dir,
            "stats": [s.stats for s in module.engine.stages], "world_size": trainer.world_size,
            "rank": trainer.global_rank}


class UserModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        import timm

        torch.manual_seed(0)
        self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)

    def validation_step(self, batch, batch_idx):
        self.net(batch[0])


def run_callback(out: Path, devices: int) -> dict:
    module = UserModule()
    calib = DataLoader(TensorDataset(images(N_CALIB, 3)), batch_size=7)
    callback = ADFQCallback(ADFQConfig(**CALLBACK_CONFIG), calib_dataloader=calib, num_calib=20)
    root = out / "callback"
    trainer = make_trainer(devices, root, callbacks=[callback], logger=False)
    trainer.validate(module, dataloaders=Data().val_dataloader(), verbose=False)
    return {"state_dict": module.net.state_dict(), "logits": probe(module.net),
            "stats": [s.stats for s in callback.stages], "rank": trainer.global_rank}


def main(argv: list[str]) -> None:
    out, devices = Path(argv[0]), int(argv[1])
    paths = argv[2].split(",") if len(argv) > 2 else ["module", "callback"]
    for path in paths:
        result = {"module": run_module, "callback": run_callback}[path](out, devices)
        torch.save(result, out / f"{path}_rank{result['rank']}.pt")
    if torch.distributed.is_initialized():  # as adfq-vit does: no rank leaves while another still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    (out / f"done_rank{result['rank']}.json").write_text(json.dumps({"paths": paths}))


if __name__ == "__main__":
    main(sys.argv[1:])
