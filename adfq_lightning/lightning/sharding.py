"""Which calibration images a rank holds, and which evaluation samples it owns, under Lightning's strategies."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, DistributedSampler

from ..data.calibration import collect_images
from ..reconstruction.cross_rank import world


def global_positions(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(global id of each local sample, mask of the samples this rank owns, global dataset size).

    Under Lightning's ``DistributedSampler`` a rank sees positions ``rank, rank + W, ...`` of the (padded)
    global order; positions past the dataset length are padding duplicates, not owned. A loader that is not
    sharded (``Trainer(use_distributed_sampler=False)``) yields every sample on every rank: each rank then owns
    the strided share ``id % W == rank``, so no sample is counted twice.
    """
    sampler = getattr(loader, "sampler", None)
    n = len(loader.dataset)
    if isinstance(sampler, DistributedSampler):
        ids = torch.tensor(list(iter(sampler)), dtype=torch.long)
        positions = sampler.rank + sampler.num_replicas * torch.arange(len(ids))
        return ids, positions < n, n
    rank, world_size = world()
    ids = torch.arange(n)
    return ids, ids % world_size == rank, n


def shard_by_rank(batches: Iterable, rank: int, world_size: int,
                  limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Strided shard ``id % W == rank`` of the first ``limit`` images of an un-sharded loader (what a rank keeps)."""
    images = collect_images(batches, limit=limit)
    ids = torch.arange(images.shape[0])
    mine = ids % world_size == rank
    return images[mine], ids[mine], images.shape[0]


def calibration_loader(trainer: pl.Trainer, explicit: Optional[Any] = None) -> Any:
    """The calibration images: ``explicit``, else the datamodule's ``calib_dataloader()``, else its
    ``train_dataloader()`` (with a warning: training loaders usually augment)."""
    if explicit is not None:
        return explicit
    datamodule = trainer.datamodule
    if datamodule is not None and callable(getattr(datamodule, "calib_dataloader", None)):
        return datamodule.calib_dataloader()
    if datamodule is not None and is_overridden("train_dataloader", datamodule, pl.LightningDataModule):
        rank_zero_warn(
            "Calibrating on the datamodule's train_dataloader(), which usually applies training augmentation: "
            "calibration should see images as they are at inference. Give the datamodule a calib_dataloader() with "
            "eval transforms, or pass ADFQCallback(calib_dataloader=...).")
        return datamodule.train_dataloader()
    raise ValueError("No calibration images: pass ADFQCallback(calib_dataloader=...), or run the Trainer with a "
                     "datamodule that has calib_dataloader() (or train_dataloader()) yielding them.")


def calibration_shard(trainer: pl.Trainer, explicit: Optional[Any] = None,
                      limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's calibration images, their global ids and the global count."""
    return shard_by_rank(calibration_loader(trainer, explicit), trainer.global_rank, trainer.world_size, limit)
