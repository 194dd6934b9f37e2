"""The algorithm core: advantage estimators, policy losses and KL estimators, each a registry.

A run picks one of each by name (``ADVANTAGES.get("grpo")``, ``POLICY_LOSSES.get("dr_grpo")``,
``KL_ESTIMATORS.get("k3")``); see each module's docstring for how a variant relates to the
published method.
"""

from ahamoment.rl.advantages import ADVANTAGES, count_constant_groups
from ahamoment.rl.kl import KL_ESTIMATORS
from ahamoment.rl.losses import POLICY_LOSSES, LossConfig, masked_mean

__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "LossConfig",
    "count_constant_groups",
    "masked_mean",
]
