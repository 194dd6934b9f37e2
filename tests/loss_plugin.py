# mypkg/losses.py
from ahamoment.rl.losses import POLICY_LOSSES, Norm, masked_mean


@POLICY_LOSSES.register("reinforce")
def reinforce_loss(logp, old_logp, advantages, mask, cfg, kl=None, norm=None):
    """Plain REINFORCE: -A * log-prob, token mean per sequence, mean over the batch."""
    norm = norm or Norm.of(mask)
    per_seq = masked_mean(-advantages[:, None] * logp, mask, dim=1)  # (B,)
    return per_seq.sum() / norm.seqs, {"clip_frac": 0.0, "kl": 0.0}
