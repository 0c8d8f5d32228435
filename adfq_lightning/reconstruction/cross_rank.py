"""Cross-rank sums: the few collectives calibration needs, on ``torch.distributed`` (what Lightning's DDP
strategies set up). Each rank holds a shard of the calibration images; these make its results global."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 in rank order (ranks may hold different lengths)."""
    _, size = world()
    if size == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def sum_gradients(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks, in one collective (a missing gradient counts as zero)."""
    if world()[1] == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad = chunk.view_as(p).clone()


class Shard:
    """This rank's calibration images among the global set: ``sample_ids[i]`` is the global id of local row i."""

    def __init__(self, sample_ids: torch.Tensor, num_samples: int) -> None:
        self.sample_ids = sample_ids.to(torch.long).cpu()
        self.num_samples = num_samples
        self.local_row = torch.full((num_samples,), -1, dtype=torch.long)
        self.local_row[self.sample_ids] = torch.arange(len(self.sample_ids))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The local rows of this rank's images among the global sample ``ids`` (-1 marks another rank's image)."""
        return self.local_row[ids]

    def own_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The local rows of this rank's images among the global sample ``ids``, others left out."""
        rows = self.local_row[ids]
        return rows[rows >= 0]
