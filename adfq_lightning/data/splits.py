"""Deterministic, class-balanced index draws: the fixed train/val split and calibration subsets."""

from __future__ import annotations

import torch

__all__ = ["calibration_indices", "split_indices"]


def split_indices(
    labels: torch.Tensor, val_per_class: int = 500, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into (train, val) indices with exactly ``val_per_class`` validation images per class.

    One ``torch.Generator`` seeded with ``seed`` draws a ``randperm`` of each class's images, in
    class order; the first ``val_per_class`` of each permutation go to validation, the rest to
    training.  Both index tensors are returned sorted.  For CIFAR-10 (5,000 per class) the
    defaults give the project's fixed 45,000 / 5,000 split.
    """
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for cls in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == cls).flatten()
        if len(members) <= val_per_class:
            raise ValueError(f"Class {cls} has {len(members)} images; need more than "
                             f"val_per_class={val_per_class} to keep some for training")
        members = members[torch.randperm(len(members), generator=generator)]
        val.append(members[:val_per_class])
        train.append(members[val_per_class:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def calibration_indices(
    labels: torch.Tensor, num: int, seed: int = 0, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """Draw ``num`` class-balanced calibration indices from ``candidates`` (default: all).

    Candidates are shuffled with ``seed`` and then taken round-robin over classes (the first image
    of every class, then the second, ...), so any prefix of the result is balanced as well.
    """
    if candidates is None:
        candidates = torch.arange(len(labels))
    if num > len(candidates):
        raise ValueError(f"Asked for {num} calibration images but only {len(candidates)} are available: set "
                         f"num_calib <= {len(candidates)} (CLI: --data.init_args.num_calib) or add images")
    generator = torch.Generator().manual_seed(seed)
    candidates = candidates[torch.randperm(len(candidates), generator=generator)]
    cand_labels = labels[candidates]
    by_class = torch.argsort(cand_labels, stable=True)  # grouped by class, shuffled within
    counts = torch.bincount(cand_labels)
    class_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(by_class)) - class_start[cand_labels[by_class]]
    round_robin = torch.argsort(rank * len(counts) + cand_labels)
    return candidates[round_robin[:num]]
