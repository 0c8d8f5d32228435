"""Cross-rank sums: the few collectives calibration needs, on ``torch.distributed`` (what Lightning's DDP
strategies set up). Each rank holds a shard of the calibration images; these make its results global.

:func:`bound_collectives` gives them a process group of their own whose collectives wait at most a given time,
whatever the default group's timeout (30 minutes unless set): a rank that died makes the others fail at once
(its connections close), a rank that hangs makes them fail after that time, with a :class:`CollectiveError`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

_bounded: dict = {"group": None, "timeout": None, "default": None}


class CollectiveError(RuntimeError):
    """A collective of the calibration failed: another rank died or stopped answering within the timeout."""


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def bound_collectives(timeout_s: Optional[float]) -> None:
    """Run the collectives below in a group of every rank whose collectives time out after ``timeout_s`` seconds
    (None: the default group and its timeout). Every rank must call this, in the same order as its other
    collectives; outside a process group it does nothing."""
    if world()[1] == 1 or timeout_s is None:
        _bounded.update(group=None, timeout=None, default=None)
        return
    default = dist.group.WORLD
    if _bounded["group"] is None or _bounded["timeout"] != timeout_s or _bounded["default"] is not default:
        _bounded.update(group=dist.new_group(timeout=timedelta(seconds=timeout_s)), timeout=timeout_s,
                        default=default)


def _collective(what: str, op: Callable[..., object], *args) -> None:
    group = _bounded["group"] if _bounded["default"] is dist.group.WORLD else None
    try:
        op(*args, group=group)
    except RuntimeError as err:  # gloo: "Connection reset/closed by peer", "Timed out waiting ...ms"
        rank, size = world()
        raise CollectiveError(f"rank {rank} of {size}: the {what} across ranks failed: {cause(err, group is not None)} "
                              f"({str(err).splitlines()[0][:160]})") from err


def cause(err: BaseException, bounded: bool = True) -> str:
    """What a failed collective's error says happened to the other ranks."""
    text = str(err).lower()
    if "timed out" in text or "timeout" in text:
        limit = f"{_bounded['timeout']:g} s" if bounded and _bounded["timeout"] else "the process group's timeout"
        return f"a collective timed out: another rank stopped answering for {limit} (hung, stopped or far behind)"
    if "closed" in text or "reset" in text or "broken pipe" in text or "aborted" in text:
        return "another rank stopped: its connection closed (the process died or was killed)"
    return "another rank died or stopped answering"


def all_reduce_sum(t: torch.Tensor, what: str = "sum of a module's errors, loss terms or statistics") -> torch.Tensor:
    if world()[1] > 1:
        _collective(what, dist.all_reduce, t, dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, what: str = "broadcast of rank 0's choice") -> object:
    """Rank 0's ``obj`` on every rank: a choice that every rank must make alike (float results of the same
    computation can differ across machines)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    _collective(what, dist.broadcast_object_list, box, 0)
    return box[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 in rank order (ranks may hold different lengths)."""
    _, size = world()
    if size == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    _collective("gather of the initialisation inputs", dist.all_gather, sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(size)]
    _collective("gather of the initialisation inputs", dist.all_gather, parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def sum_gradients(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks, in one collective (a missing gradient counts as zero)."""
    if world()[1] == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), "gradient sum")
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
