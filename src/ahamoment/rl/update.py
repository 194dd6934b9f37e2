"""The policy update of one GRPO step: anchors (old-policy and reference log-probs), then M
minibatches x μ epochs of optimizer steps on the chosen policy loss.

Deviations from GRPO as published, all chosen by config (registries in ``rl/``):

- old-policy log-probs are needed only when a rollout batch makes several optimizer steps (or
  the KL placement needs them); with exactly one step they are the current log-probs,
  detached (ratio 1, the same gradient). Where they are needed, ``OLD_LOGP`` says where they
  come from: one no-grad forward before the first update (``forward``), or the sampler's own
  log-probs (``sampler``) when it decoded these very weights in this process: the same
  policy to float rounding (``sampler_mismatch`` logs the gap), without the forward;
- the sampler's own log-probs are a diagnostic (``sampler_mismatch``) and, with
  ``tis_cap > 0``, the behaviour policy of a truncated importance weight (``rl/tis.py``);
- with no reference model, rows whose advantage is exactly 0 (all-equal groups) skip their
  forward and backward when the loss is advantage-only (``skip_zero_adv``): they add exactly
  0 to the gradient, so the update is unchanged; entropy, clip fraction and sampler mismatch
  are then over the rows trained (``train_rows_frac`` says how many).

Several processes: every rank holds the whole batch and takes its contiguous share of each
minibatch (``Ranks.piece``). The loss normaliser (:class:`Norm`) is the whole minibatch's, and
each rank's loss is multiplied by W because DDP averages gradients over ranks, so the synced
gradient is the one-process gradient. Ranks with fewer micro-batches add zero-weight passes,
so all make the same number of forward/backward calls; only the last call of a minibatch
syncs gradients. Statistics are summed over ranks before they are averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import astuple, dataclass, fields, replace
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from ahamoment.distributed import Ranks
from ahamoment.logprobs import completion_logprobs, right_pad
from ahamoment.registry import Registry
from ahamoment.rl.kl import KL_ESTIMATORS, KL_PLACEMENTS
from ahamoment.rl.losses import POLICY_LOSSES, LossConfig, Norm, masked_mean
from ahamoment.rl.rollouts import Rollout
from ahamoment.rl.tis import IMPORTANCE, scale_grad


@dataclass(frozen=True)
class UpdateSettings:
    """How one rollout batch trains the policy (`aha zero` builds these from its config)."""

    loss: str
    """Policy loss (``rl/losses.py``)."""
    loss_config: LossConfig
    """Clip range, β and the loss's token constant."""
    kl_estimator: str
    """KL estimator (``rl/kl.py``)."""
    group_size: int
    minibatches: int = 1
    """M: optimizer steps per epoch."""
    epochs: int = 1
    """μ: passes over the batch."""
    micro_batch: int = 0
    """Rows per forward/backward; 0: one group when it divides the minibatch, else all."""
    skip_zero_adv: bool = True
    temperature: float = 1.0
    """Divides the trainer's logits, as the sampler's."""
    tis_cap: float = 0.0
    """With C > 0, the sampler's log-probs are the behaviour policy of an importance weight
    capped at C (``rl/tis.py``)."""
    importance: str = "truncate"
    """How the weight is capped (``IMPORTANCE``): truncate (TIS) or mask (AReaL)."""
    max_grad_norm: float = 1.0
    pad_id: int = 0
    old_logp: str = "forward"
    """Where old-policy log-probs come from when they are needed (``OLD_LOGP``)."""
    bf16: bool = False
    """bf16 autocast around every trainer forward: the packed path calls the layers directly,
    past the autocast accelerate wraps around the model's forward."""

    def autocast(self, device: torch.device):
        """The autocast context of the trainer's forwards on ``device`` (off without bf16)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def updates(self) -> int:
        return self.minibatches * self.epochs

    def with_kl(self, kl_coef: float) -> UpdateSettings:
        """The same settings with β of the loss's KL term set to ``kl_coef``."""
        return replace(self, loss_config=replace(self.loss_config, kl_coef=kl_coef))


@dataclass
class TrainBatch:
    """A scored rollout with what the loss needs per row."""

    rollout: Rollout
    advantages: Tensor
    """(B,)"""
    in_loss: Tensor
    """(B,) bool: False leaves a completion out of the loss (overlong masking)."""
    old_logp: Tensor | None = None
    """(B, Lc) the policy before the first update; None: exactly one update (current, detached)."""
    ref_logp: Tensor | None = None
    """(B, Lc) the frozen reference; None: no KL term."""


@dataclass
class Anchors:
    """What :func:`anchor` returns: log-probs to hold the update to, and the rewards after the
    KL placement (which may move the penalty into them)."""

    rewards: Tensor
    """(B,)"""
    old_logp: Tensor | None
    ref_logp: Tensor | None
    loss_kl: float
    """β of the KL term left in the loss (0 when the placement moved it into the reward)."""


@torch.no_grad()
def anchor(
    policy: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    batch: Rollout,
    rewards: Tensor,
    settings: UpdateSettings,
    placement: str,
    ranks: Ranks | None = None,
) -> Anchors:
    """Old-policy and reference log-probs of ``batch``, only where needed, and the KL
    placement applied to ``rewards`` (B,)."""
    ranks = ranks or Ranks()
    place = KL_PLACEMENTS.get(placement)
    needs_old = getattr(place, "needs_policy_logp", False)
    T, pad = settings.temperature, settings.pad_id
    old = ref = None
    if settings.updates > 1 or (ref_model is not None and needs_old):
        with settings.autocast(next(policy.parameters()).device):
            old = OLD_LOGP.get(settings.old_logp)(policy, batch, settings, ranks)  # (B, Lc)
    if ref_model is None:
        return Anchors(rewards=rewards, old_logp=old, ref_logp=None, loss_kl=0.0)
    ref = served_ref(batch, next(ref_model.parameters()).device)  # (B, Lc) from the servers
    if ref is None:
        with settings.autocast(next(ref_model.parameters()).device):
            ref = sharded_logprobs(ref_model, batch, T, pad, ranks)  # (B, Lc)
    kl_tok = KL_ESTIMATORS.get(settings.kl_estimator)(old, ref) if needs_old else None  # (B, Lc)
    mask = right_pad([c.ids for c in batch.completions], pad)[1]  # (B, Lc)
    rewards, loss_kl = place(rewards, kl_tok, mask, settings.loss_config.kl_coef)
    return Anchors(rewards=rewards, old_logp=old, ref_logp=ref, loss_kl=loss_kl)


def served_ref(batch: Rollout, device: torch.device | str = "cpu") -> Tensor | None:
    """(B, Lc) reference log-probs that rollout servers computed with the trainer's very
    reference (``rollout/server_engine.py``), zero-padded; None unless every row has them."""
    rows = [c.ref_logprobs for c in batch.completions]
    if not rows or any(r is None for r in rows):
        return None
    out = torch.zeros((len(rows), max(1, max(len(c.ids) for c in batch.completions))))
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


OldLogpFn = Callable[[torch.nn.Module, Rollout, UpdateSettings, Ranks], Tensor]
OLD_LOGP: Registry[OldLogpFn] = Registry("old-policy log-prob source")


@OLD_LOGP.register("forward")
def old_by_forward(policy, batch: Rollout, settings: UpdateSettings, ranks: Ranks) -> Tensor:
    """(B, Lc) one no-grad forward of the policy before its first update."""
    return sharded_logprobs(policy, batch, settings.temperature, settings.pad_id, ranks)


@OLD_LOGP.register("sampler")
def old_from_sampler(policy, batch: Rollout, settings: UpdateSettings, ranks: Ranks) -> Tensor:
    """(B, Lc) the log-probs the sampler drew each token with: the behaviour policy itself.
    Only for a sampler that decoded the current weights (`aha zero` checks); no forward."""
    if any(len(c.logprobs) != len(c.ids) for c in batch.completions):
        raise ValueError("old_logp=sampler: a completion came back without its log-probs")
    width = max(1, max(len(c.ids) for c in batch.completions))  # Lc
    like = torch.zeros((len(batch), width), device=next(policy.parameters()).device)
    return batch.sampler_logprobs(range(len(batch)), like)


def sharded_logprobs(net, batch: Rollout, temperature: float, pad_id: int, ranks: Ranks):
    """No-grad log-probs (B, Lc) of every row, each rank computing its contiguous share.

    ``net`` is the bare module (no DDP wrapper): no collective runs inside, so ranks with
    different shares never wait on each other."""
    width = max(1, max(len(c.ids) for c in batch.completions))  # Lc: the longest completion
    mine = list(ranks.piece(len(batch)))
    device = next(net.parameters()).device
    part = torch.zeros((0, width), device=device)
    if mine:
        part, _, _ = completion_logprobs(
            net,
            [batch.prompts[r] for r in mine],
            [batch.completions[r].ids for r in mine],
            temperature,
            pad_id,
            width=width,
        )  # (b, Lc)
    parts = ranks.gather(part.detach().float().cpu())
    return torch.cat(parts).to(device)  # (B, Lc)


@dataclass
class _Sums:
    """A minibatch's statistics, each summed over its micro-batches with the weight its
    mean is over (tokens, or clip units: sequences for a sequence-level loss)."""

    loss: float = 0.0
    clip: float = 0.0  # clip fraction x units
    units: float = 0.0
    kl: float = 0.0  # x tokens
    entropy: float = 0.0  # x tokens
    tokens: float = 0.0
    tis: float = 0.0  # x tokens

    def reduced(self, ranks: Ranks) -> _Sums:
        return _Sums(*ranks.sum(astuple(self)))


@dataclass
class _Stats:
    """Per-minibatch means, averaged over minibatches at the end."""

    loss: list[float]
    clip_frac: list[float]
    kl: list[float]
    entropy: list[float]
    grad_norm: list[float]
    tis_weight: list[float]

    def add(self, s: _Sums, grad_norm: Any) -> None:
        self.loss.append(s.loss)
        self.clip_frac.append(s.clip / max(s.units, 1.0))
        self.kl.append(s.kl / max(s.tokens, 1.0))
        self.entropy.append(s.entropy / max(s.tokens, 1.0))
        self.tis_weight.append(s.tis / max(s.tokens, 1.0))
        self.grad_norm.append(float("nan") if grad_norm is None else float(grad_norm))

    def means(self) -> dict[str, float]:
        return {f.name: sum(v) / len(v) for f in fields(self) for v in [getattr(self, f.name)]}


def policy_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    batch: TrainBatch,
    settings: UpdateSettings,
    gen: torch.Generator,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """M minibatches x μ epochs over one rollout batch: one optimizer step per minibatch.

    A minibatch is split into micro-batches whose gradients accumulate; every call gets the
    whole minibatch's :class:`Norm`, so the gradient does not depend on the split. Each
    micro-batch is padded only to its own longest completion (``old_logp``/``ref_logp`` are
    sliced to that width), and a minibatch's rows are taken in batch order, so a group's rows
    stay together and share one prompt forward.
    """
    ranks = ranks or Ranks()
    s = settings
    loss_fn = POLICY_LOSSES.get(s.loss)
    kl_fn = KL_ESTIMATORS.get(s.kl_estimator)
    per_seq_clip = getattr(loss_fn, "sequence_level", False)
    device = next(model.parameters()).device
    rollout, lengths = batch.rollout, batch.rollout.lengths
    adv, in_loss = batch.advantages.to(device), batch.in_loss.to(device)
    old_logp = batch.old_logp.to(device) if batch.old_logp is not None else None
    ref_logp = batch.ref_logp.to(device) if batch.ref_logp is not None else None
    B = len(rollout)
    stats = _Stats([], [], [], [], [], [])
    mismatch, n_tokens = None, 0.0
    mb = B // s.minibatches
    micro = min(s.micro_batch, mb) or (s.group_size if mb % s.group_size == 0 else mb)
    mis_sum, mis_n = 0.0, 0.0
    skip = (
        (adv == 0).tolist()
        if s.skip_zero_adv and ref_logp is None and getattr(loss_fn, "advantage_only", False)
        else [False] * B
    )
    n_live = 0
    for _epoch in range(s.epochs):
        order = torch.randperm(B, generator=gen) if s.minibatches > 1 else torch.arange(B)
        for m in range(s.minibatches):
            # batch order inside a minibatch: same rows (same gradient), groups kept together
            rows = sorted(order[m * mb : (m + 1) * mb].tolist())
            norm = Norm(
                seqs=float(len(rows)),
                tokens=max(1.0, float(sum(lengths[r] for r in rows if in_loss[r]))),
            )
            # rows that add exactly 0 to the gradient need no forward (skip_zero_adv)
            live = [r for r in rows if not skip[r]]
            n_live += len(live)
            mine = [live[i] for i in ranks.piece(len(live))]
            chunks: list[list[int] | None] = [
                mine[c : c + micro] for c in range(0, len(mine), micro)
            ]
            n_calls = max(-(-len(ranks.piece(len(live), r)) // micro) for r in range(ranks.world))
            chunks += [None] * (n_calls - len(chunks))  # zero-weight passes, see the docstring
            sums = _Sums()
            for c, chunk in enumerate(chunks):
                weight = float(ranks.world) if chunk is not None else 0.0
                chunk = chunk if chunk is not None else rows[:1]
                idx = torch.tensor(chunk, device=device)
                sync = accelerator.no_sync(model) if c < len(chunks) - 1 else nullcontext()
                with sync:
                    with s.autocast(device):
                        logp, mask, ent = rollout.logprobs(
                            model, chunk, s.temperature, s.pad_id, entropy=True
                        )  # (b, Lc) each, Lc = this chunk's longest completion
                    logp = logp.float()
                    Lc = logp.shape[1]
                    mask = mask * in_loss[idx].unsqueeze(1).to(mask.dtype)  # (b, Lc)
                    old = old_logp[idx, :Lc] if old_logp is not None else logp.detach()
                    kl = kl_fn(logp, ref_logp[idx, :Lc]) if ref_logp is not None else None
                    # sampler log-probs: needed for TIS, and for the mismatch diagnostic (first
                    # minibatch only); not rebuilt for every micro-batch otherwise
                    need_samp = s.tis_cap > 0 or mismatch is None
                    samp = rollout.sampler_logprobs(chunk, logp) if need_samp else None  # (b, Lc)
                    pg_logp, tis = logp, None
                    if s.tis_cap > 0:  # same values, policy-gradient term weighted per token
                        tis = IMPORTANCE.get(s.importance)(old, samp, mask, s.tis_cap)  # (b, Lc)
                        pg_logp = scale_grad(logp, tis)
                    loss, st = loss_fn(pg_logp, old, adv[idx], mask, s.loss_config, kl, norm)
                    accelerator.backward(loss * weight)
                if weight == 0.0:
                    continue
                # clip_frac is over sequences for a sequence-level loss (gspo), else tokens
                units = float(mask.any(dim=1).sum() if per_seq_clip else mask.sum())
                tok = float(mask.sum())
                sums.loss += loss.item()
                sums.clip += st["clip_frac"] * units
                sums.units += units
                sums.kl += st["kl"] * tok
                sums.entropy += masked_mean(ent, mask).item() * tok
                sums.tokens += tok
                sums.tis += (masked_mean(tis, mask).item() if tis is not None else 1.0) * tok
                if mismatch is None:  # sampler vs trainer log-probs, on-policy tokens only
                    diff = (logp.detach() - samp).abs()
                    mis_sum += float(torch.where(mask.bool(), diff, 0.0).sum())
                    mis_n += float(mask.sum())
            if mismatch is None:  # over the first minibatch, before any update
                mis_sum, mis_n = ranks.sum([mis_sum, mis_n])
                mismatch = mis_sum / max(mis_n, 1.0)
            for p in model.parameters():  # nothing trained: a zero gradient, not none, so
                if p.requires_grad and p.grad is None:  # AdamW's moments move as without skips
                    p.grad = torch.zeros_like(p)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total = sums.reduced(ranks)
            n_tokens += total.tokens
            stats.add(total, grad_norm)
    out = stats.means()
    out["sampler_mismatch"] = mismatch if mismatch is not None else 0.0
    out["train_tokens"] = int(n_tokens)
    out["train_rows_frac"] = n_live / max(1, B * s.epochs)
    return out
