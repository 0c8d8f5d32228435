"""Mixed precision: the width of every layer's weights and activations, chosen under a bit budget.

:func:`allocate_bits` measures how much each layer's output costs at each candidate width (KL of the model's
logits to the float model's, that layer alone quantized), then picks the widths that cost least in sum while the
average width stays within a :class:`BitBudget` (an exact integer program), and returns them as the
``overrides`` that :class:`~adfq_lightning.ADFQConfig` takes.
"""

from .allocate import allocate_bits
from .budget import BitBudget
from .solver import choose_widths

__all__ = ["BitBudget", "allocate_bits", "choose_widths"]
