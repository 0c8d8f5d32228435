"""Which calibration images a rank holds, and their global ids, from the loader Lightning prepared."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..api import collect_images
from ..distributed import world


def global_positions(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(global id of each local sample, mask of the samples this rank owns, global dataset size).

    Under Lightning's ``DistributedSampler`` a rank sees positions ``rank, rank + W, ...`` of the (padded)
    global order; positions past the dataset length are padding duplicates, not owned. A loader that is not
    sharded (``Trainer(use_distributed_sampler=False)``) yields every sample on every rank: each rank then owns
    the strided share ``id % W == rank``, so no sample is counted (or cached) twice.
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


def shard_from_loader(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's calibration images (padding and other ranks' samples dropped), their global ids, the global count."""
    ids, real, n = global_positions(loader)
    images = collect_images(loader)
    if images.shape[0] != ids.shape[0]:
        raise RuntimeError("the calibration loader must yield every sample once, in sampler order (drop_last=False).")
    return images[real], ids[real], n


def shard_by_rank(batches: Iterable, rank: int, world_size: int, limit: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Strided shard of the first ``limit`` images of an un-sharded loader (what each rank keeps)."""
    images = collect_images(batches, limit=limit)
    ids = torch.arange(images.shape[0])
    mine = ids % world_size == rank
    return images[mine], ids[mine], images.shape[0]
