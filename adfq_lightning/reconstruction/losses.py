"""The three terms of the ASMO objective and the AdaRound exponent schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def output_loss(pred: torch.Tensor, target: torch.Tensor, p: float, per_sample_norm: float, batch: int) -> torch.Tensor:
    """Lp output error, summed over the module's dim 1 and averaged over the rest (the reference's form).

    Returned as a *sum* over the local samples divided by the global ``batch``, so the ranks' terms add up to
    the single-process value.
    """
    return (pred - target).abs().pow(p).sum() / (batch * per_sample_norm)


def attention_kl(scores_q: torch.Tensor, scores_fp: torch.Tensor, temperature: float, batch: int) -> torch.Tensor:
    """KL(P_fp || P_q) of the temperature-softened attention distributions over keys, averaged over rows.

    ``scores_*`` are per-sample pre-softmax scores ``(n, maps, heads, queries, keys)``. The distribution over keys is
    what attention is; the full-precision scores are the target, as in knowledge distillation. (For the
    reference code's form see :func:`attention_kl_heads`.)
    """
    rows = scores_q[0].numel() // scores_q.shape[-1]
    log_q = F.log_softmax(scores_q / temperature, dim=-1)
    log_fp = F.log_softmax(scores_fp / temperature, dim=-1)
    return (log_fp.exp() * (log_fp - log_q)).sum() / (batch * rows)


def attention_kl_heads(scores_q: torch.Tensor, scores_fp: torch.Tensor, temperature: float, batch: int) -> torch.Tensor:
    """The reference code's term: ``KLDivLoss(batchmean)(log_softmax(P_fp / T, dim=heads), softmax(P_q / T,
    dim=heads))`` on the attention *probabilities* P, i.e. KL(P_q || P_fp) across heads, summed over every
    (query, key) pair and divided by the number of attention maps (images, times windows for Swin)."""
    maps = scores_q.shape[1]  # per-sample scores are (n, maps, heads, N, N): maps = windows for Swin, else 1
    log_fp = F.log_softmax(scores_fp.softmax(-1) / temperature, dim=2)
    log_q = F.log_softmax(scores_q.softmax(-1) / temperature, dim=2)
    return (log_q.exp() * (log_q - log_fp)).sum() / (batch * maps)


def rounding_beta(iteration: int, iters: int, warmup: float, start: float, end: float) -> float:
    """AdaRound exponent: ``start`` until warm-up ends, then linear decay to ``end``."""
    begin = warmup * iters
    if iteration < begin:
        return start
    return end + (start - end) * max(0.0, 1.0 - (iteration - begin) / max(iters - begin, 1))


def cosine_lr(base: float, iteration: int, iters: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * iteration / iters))
