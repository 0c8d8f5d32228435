"""Attention-score enhanced Module-wise Optimization (ASMO), one file per job.

:mod:`.reconstructor` (the stage loop), :mod:`.cache` (the activation cache), :mod:`.heldout` (held-out error
and safeguard), :mod:`.bias_correction`, :mod:`.cross_rank` (cross-rank sums), :mod:`.learnable` (what is
learned, its optimizer), :mod:`.losses`, :mod:`.schedule` (each module's schedule, the adaptive budget),
:mod:`.units` (the unit chain), :mod:`.cuda_graph` and :mod:`.compiled` (fused iterations).
"""

from .learnable import make_optimizer
from .reconstructor import Reconstructor, Stage
from .units import build_units, check_supported

__all__ = ["Reconstructor", "Stage", "build_units", "check_supported", "make_optimizer"]
