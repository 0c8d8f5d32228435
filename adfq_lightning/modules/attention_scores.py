"""Pre-softmax attention-score recording, shared by the quantized attentions, for the reconstruction loss."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn


class AttentionScores(nn.Module):
    """Shared score bookkeeping of the quantized attentions.

    With ``record_scores`` on, the pre-softmax scores of the last call are kept in ``scores`` (softmax them
    for the probabilities) so that a reconstruction loss can read them without changing what the module
    returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record_scores = False
        self.scores: Optional[torch.Tensor] = None

    def _probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        self.scores = scores if self.record_scores else None
        return scores.softmax(dim=-1)


@contextmanager
def recording_scores(module: nn.Module) -> Iterator[None]:
    """Within this context the attention modules inside ``module`` keep their pre-softmax scores."""
    attn = [m for m in module.modules() if isinstance(m, AttentionScores)]
    for m in attn:
        m.record_scores = True
    try:
        yield
    finally:
        for m in attn:
            m.record_scores, m.scores = False, None
