"""A KL placement loaded by import path in test_zero_options.py: the real "reward" placement,
recording what `aha zero` hands it."""

from ahamoment.rl.kl import kl_in_reward

CALLS: list[dict] = []


def recording(rewards, kl, mask, kl_coef):
    CALLS.append({"rewards": rewards.shape, "kl": kl.shape, "mask": mask.shape, "beta": kl_coef})
    return kl_in_reward(rewards, kl, mask, kl_coef)


recording.needs_policy_logp = True  # as kl_in_reward: the KL of the policy before any update
