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


def attention_kl(scores_q: torch.Tensor, scores_fp: torch.Tensor, temperature: float, rows: int, batch: int) -> torch.Tensor:
    """KL(P_fp || P_q) of the temperature-softened attention distributions, averaged over attention rows.

    Reading of the reference: it applies softmax over the *heads* axis of already-softmaxed probabilities,
    with the quantized scores as the target. We take the distribution over keys (what attention is), soften
    the pre-softmax scores with ``temperature`` and use the full-precision scores as the target, as in
    knowledge distillation.
    """
    log_q = F.log_softmax(scores_q / temperature, dim=-1)
    log_fp = F.log_softmax(scores_fp / temperature, dim=-1)
    return (log_fp.exp() * (log_fp - log_q)).sum() / (batch * rows)


def rounding_beta(iteration: int, iters: int, warmup: float, start: float, end: float) -> float:
    """AdaRound exponent: ``start`` until warm-up ends, then linear decay to ``end``."""
    begin = warmup * iters
    if iteration < begin:
        return start
    return end + (start - end) * max(0.0, 1.0 - (iteration - begin) / max(iters - begin, 1))


def cosine_lr(base: float, iteration: int, iters: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * iteration / iters))
