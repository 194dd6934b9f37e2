"""The algorithm core: advantage estimators, policy losses, KL estimators and placements, and
DAPO's group filters and overlong handlers, each a registry.

A run picks one of each by name (``ADVANTAGES.get("grpo")``, ``POLICY_LOSSES.get("dapo")``,
``KL_ESTIMATORS.get("k3")``, ``KL_PLACEMENTS.get("loss")``); see each module's docstring for
how a variant relates to the published method. Adding a variant is one registered function.
"""

from ahamoment.rl.advantages import ADVANTAGES, count_constant_groups
from ahamoment.rl.kl import KL_ESTIMATORS, KL_PLACEMENTS
from ahamoment.rl.losses import POLICY_LOSSES, LossConfig, Norm, default_clip, masked_mean
from ahamoment.rl.shaping import GROUP_FILTERS, OVERLONG, OverlongConfig

__all__ = [
    "ADVANTAGES",
    "GROUP_FILTERS",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "OVERLONG",
    "POLICY_LOSSES",
    "LossConfig",
    "Norm",
    "OverlongConfig",
    "count_constant_groups",
    "default_clip",
    "masked_mean",
]
