"""Learning-rate multipliers, shared by the stages (each one a LambdaLR factor of the step).

``step`` is 0-based and counts optimizer steps; the multiplier scales the config's peak lr.
"""

from __future__ import annotations

import math


def warmup(step: int, steps: int) -> float:
    """Linear warm-up: (step + 1) / steps for the first ``steps`` steps, then 1."""
    return min(1.0, (step + 1) / max(1, steps))


def warmup_cosine(step: int, warmup_steps: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then a cosine from 1 down to ``floor`` at step ``total``
    (pretraining and SFT: the decay ends at 10% of the peak, not at 0)."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_linear_decay(step: int, warmup_steps: int, total: int, decay: int) -> float:
    """Linear warm-up, then 1, then a linear decay over the last ``decay`` steps that reaches
    1/decay on the last step (``aha zero``). A decay longer than ``total`` covers every step."""
    decay = min(decay, total)
    left = total - step  # steps still to take, this one included
    return warmup(step, warmup_steps) * (min(1.0, left / decay) if decay else 1.0)
