"""`aha zero`: R1-Zero, i.e. GRPO straight on a base model with rule-based rewards only.

Each step: (1) sample G completions for each of P prompts, refilling dropped groups when a
group filter is set (DAPO dynamic sampling); (2) score them (answer correctness plus format)
and apply the overlong handler; (3) compute old-policy and reference log-probs where needed,
and let the KL placement move the penalty into the reward if so chosen; (4) turn rewards into
group-relative advantages; (5) make one optimizer step per minibatch for μ epochs on the
chosen policy loss, accumulating micro-batches; (6) log; (7) checkpoint. Held-out problems are
evaluated before, during and after training. Every variant (advantage, loss, KL estimator and
placement, group filter, overlong handler) is a registry entry in `rl/`, never a branch here.

How this differs from GRPO as published (DeepSeekMath / DeepSeek-R1):
- the policy loss, advantage estimator and KL estimator are registry entries (`rl/`); the
  defaults are GRPO's sequence-mean loss and (r - mean) / (std + 1e-4);
- the default KL is k2 with β = 0.5, far stronger than R1's k3 with β = 0.001: on the tiny
  embedded model, outcome-only rewards give the arithmetic inside <think> almost no signal, and
  without the anchor it decays to garbage within ~20 steps (measured; see the README);
- old-policy log-probs come from one no-grad forward before the first update when a rollout
  batch makes several optimizer steps; with exactly one step they are the current log-probs,
  detached (ratio 1, identical gradient). The sampler's own log-probs are a diagnostic
  (``sampler_mismatch``), and with ``--tis-cap C`` the truncated importance weight
  min(exp(old - sampler), C) of each token's policy-gradient term (``rl/tis.py``);
- with β = 0, rows whose advantage is exactly 0 (all-equal groups) skip their forward and
  backward: they add exactly 0 to the gradient, so the update is unchanged, but entropy, clip
  fraction and sampler mismatch are then logged over the rows trained (``--skip-zero-adv``);
- trainer log-probs of Llama-style models run packed, with no padding (``logprobs.py``).

Several processes (`accelerate launch` / `torchrun`; see ``distributed.py``): the P prompts of a
sampling round are cut into seed blocks dealt to the ranks, each block sampled under its own
seed (so the completions do not depend on the process count), scored where it was sampled, and
gathered; every rank then holds the whole step batch, computes the same advantages and loss
normalisers, and trains on its contiguous share of each minibatch. Rank 0 logs, checkpoints and
evaluates.
"""

from __future__ import annotations

import json
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table

from ahamoment import checkpoint, lora
from ahamoment import config as cfglib
from ahamoment.data import sample_excluding
from ahamoment.distributed import (
    Ranks,
    claim_run_dir,
    make_accelerator,
    seed_blocks,
    seeded_generator,
    share_threads,
)
from ahamoment.evaluation import (
    Generated,
    encode_prompts,
    evaluate,
    generate,
    stop_ids,
    template_baseline,
)
from ahamoment.logging_backends import LOGGERS, NullLogger, make_logger
from ahamoment.logprobs import completion_logprobs, right_pad
from ahamoment.metrics import (
    has_reflection,
    is_self_correction,
    length_stats,
    mixing_rate,
    step_accuracy,
)
from ahamoment.models import load_model, load_tokenizer, n_params
from ahamoment.progress import progress_bar
from ahamoment.registry import Registry
from ahamoment.rewards import REWARDS, RewardBatch, format_reward, score
from ahamoment.rl import (
    ADVANTAGES,
    GROUP_FILTERS,
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    OVERLONG,
    POLICY_LOSSES,
    LossConfig,
    Norm,
    OverlongConfig,
    count_constant_groups,
    default_clip,
    masked_mean,
)
from ahamoment.rl.tis import scale_grad, tis_weights
from ahamoment.rollout import ENGINES, Engine, SamplingParams, make_engine
from ahamoment.schedules import warmup_linear_decay
from ahamoment.splits import excluded, heldout, real_countdown
from ahamoment.stages.pretrain import ensure_base_model
from ahamoment.tasks import TASKS, get_task
from ahamoment.tasks.base import Problem


@dataclass
class ZeroConfig:
    model: str = ""
    """Local HF causal-LM directory. Empty: the embedded default, built by `aha pretrain` on first use."""
    pretrain_recipe: str = ""
    """With no --model: YAML recipe for the embedded base model built on first use (default: `aha pretrain` defaults)."""
    task: str = "countdown"
    """Task for RL prompts and held-out evaluation (countdown, countdown_tinyzero, arithmetic, or pkg.mod:obj)."""
    steps: int = 200
    """GRPO steps (rollout batches)."""
    prompts_per_step: int = 16
    """P: distinct prompts per rollout batch."""
    group_size: int = 8
    """G: completions sampled per prompt; advantages are relative within each group."""
    temperature: float = 1.0
    """Rollout sampling temperature (also divides the trainer's logits, so ratios match)."""
    top_p: float = 1.0
    """Rollout nucleus sampling."""
    max_new_tokens: int = 128
    """Longest completion; longer ones are truncated (finish reason 'length')."""
    engine: str = "torch"
    """Rollout engine (rollout/): torch (our KV-cache sampler), hf (transformers generate), vllm (GPU extra)."""
    reward: str = "accuracy=1.0,format=0.1"
    """Weighted rewards as name=weight pairs; a name may be an import path pkg.mod:fn (weight 1 if omitted)."""
    advantage: str = "grpo"
    """Advantage estimator from rl/advantages.py: grpo, dr_grpo, rloo."""
    loss: str = "grpo"
    """Policy loss from rl/losses.py: grpo (sequence mean), dr_grpo (token sum / max_new_tokens)."""
    optimizer: str = "adamw"
    """Optimizer: adamw, or sgd (momentum 0.9; moves only weights with a consistent gradient)."""
    lr: float = 5e-4
    """Learning rate (constant after warm-up, unless lr_decay)."""
    warmup: int = 5
    """Linear learning-rate warm-up steps."""
    lr_decay: int = 0
    """Linear learning-rate decay to 0 over the last N steps (warm-up, constant, decay; all of them when N >= steps); 0: constant to the end."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    minibatches: int = 1
    """M: optimizer steps per rollout batch per epoch (DeepSeek-R1 used 16)."""
    epochs: int = 1
    """μ: passes over each rollout batch."""
    micro_batch: int = 0
    """Sequences per forward/backward inside a minibatch (gradient accumulation); Llama-style models run them packed (no padding), others padded to the micro-batch's longest completion; 0: one group (group_size rows, one prompt) when it divides the minibatch, else the whole minibatch; at least the minibatch's size: the whole minibatch."""
    skip_zero_adv: bool = True
    """Skip the forward and backward of rows whose advantage is exactly 0 (all-equal groups) when kl_coef is 0: they add exactly 0 to the gradient, so the update is the same; entropy, clip fraction and sampler mismatch are then logged over the rows trained (train_rows_frac says how many)."""
    eps_low: float | None = None
    """Ratio clip below 1; empty: the loss's own (0.2; gspo 3e-4). R1's stage-1 used 10 (>= 1: no lower clip)."""
    eps_high: float | None = None
    """Ratio clip above 1; empty: the loss's own (0.2; dapo 0.28, gspo 4e-4)."""
    kl_coef: float = 0.5
    """β for the KL penalty to a frozen reference (0: no reference model, no reference forward)."""
    kl_estimator: str = "k2"
    """KL estimator from rl/kl.py: k1, k2, k3. R1 uses k3 (β 0.001); k2's gradient is the true KL gradient."""
    kl_placement: str = "loss"
    """Where the KL acts (rl/kl.py): loss (per token, as R1 and TRL) or reward (r - β·Σ_t kl_t, as PPO-RLHF)."""
    group_filter: str = "all"
    """Groups kept for training (rl/shaping.py): all, or nonconstant (DAPO dynamic sampling: refill dropped groups)."""
    max_sampling_rounds: int = 3
    """With a group filter: at most this many rounds of P prompts per step to refill the batch."""
    overlong: str = "none"
    """Truncated completions (rl/shaping.py): none, mask (left out of the loss), soft (DAPO length penalty)."""
    overlong_buffer: int = 16
    """soft: the penalty ramps over the last N tokens of max_new_tokens."""
    overlong_penalty: float = 1.0
    """soft: the penalty at max_new_tokens (a correct answer earns 1)."""
    ref_refresh: int = 0
    """Copy the policy into the reference every N steps (R1: 400); 0 never refreshes."""
    eval_every: int = 50
    """Evaluate on `eval_n` held-out problems every N steps (0: only before and after)."""
    eval_n: int = 200
    """Held-out problems in the periodic evaluations."""
    heldout_n: int = 500
    """Held-out problems (disjoint from training by canonical form) for the before/after table."""
    eval_k: int = 4
    """Samples per held-out problem for pass@1 (mean over k) and pass@k."""
    eval_temperature: float = 1.0
    """Held-out sampling temperature."""
    eval_top_p: float = 1.0
    """Held-out nucleus sampling."""
    real_eval: bool = True
    """Also evaluate on the packaged real Countdown sample (1,024 TinyZero problems; Countdown tasks only)."""
    real_k: int = 1
    """Samples per real Countdown problem (at eval_temperature, no greedy pass): a model trained on the default task searches to max_new_tokens on them, so each sample costs a full budget."""
    log: str = "jsonl"
    """Extra metrics logger besides metrics.jsonl: jsonl (none), tensorboard (pip install 'ahamoment[tensorboard]'), wandb (offline; only when installed)."""
    samples_per_step: int = 2
    """Completions written to samples.jsonl per step."""
    save_every: int = 50
    """Checkpoint every N steps (and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    out: str = ""
    """Run directory; empty means runs/zero-<timestamp>."""
    resume: bool = False
    """Continue the run in --out (or the newest runs/zero-*) from its last checkpoint."""
    seed: int = 0
    """Seed for prompts, sampling and the evaluation draws."""
    threads: int = 0
    """torch CPU threads; 0 shares the cores this process may run on among the processes of this machine."""
    seed_block: int = 0
    """Prompts sampled together under one seed, drawn from (seed, step, round, block): every process count that divides P / seed_block samples the same completions. 0: P / processes (one block per process, the fastest); 1: one seed per prompt (any process count; the torch engine then decodes one group at a time, ~5x slower rollouts on the embedded model)."""
    device: str = "cpu"
    """Where to train: cpu, or auto (what accelerate picks: the process's GPU when there is one)."""
    bf16: bool = False
    """bf16 mixed precision through accelerate (autocast; weights and optimizer state stay fp32). For GPUs: 2.4x slower on CPU at the embedded size."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute); the trainer forward then runs prompt and completion together instead of sharing the prompt."""
    tis_cap: float = 0.0
    """Truncated importance sampling (rl/tis.py): each token's policy-gradient term is weighted by min(exp(old_logp - sampler_logp), C), correcting for a sampler (vLLM) whose log-probs differ from the trainer's; 0: off."""
    lora_rank: int = 0
    """LoRA rank r through peft; 0: full fine-tuning."""
    lora_alpha: float = 32.0
    """LoRA scaling alpha (the update is B·A·alpha/r)."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated module names that get LoRA adapters."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages compare samples in a group")
        batch = self.prompts_per_step * self.group_size
        if self.minibatches < 1 or batch % self.minibatches:
            raise ValueError(
                f"minibatches ({self.minibatches}) must divide prompts_per_step x group_size ({batch})"
            )
        if min(self.heldout_n, self.eval_n, self.eval_k, self.real_k) < 1:
            raise ValueError("heldout_n, eval_n, eval_k and real_k must be positive")
        mb = batch // self.minibatches
        if self.micro_batch < 0 or (0 < self.micro_batch < mb and mb % self.micro_batch):
            raise ValueError(
                f"micro_batch ({self.micro_batch}) must divide the minibatch "
                f"({mb} sequences), be at least its size, or be 0"
            )
        if self.lr_decay < 0:
            raise ValueError(f"lr_decay must be >= 0, got {self.lr_decay}")
        if self.max_sampling_rounds < 1:
            raise ValueError("max_sampling_rounds must be at least 1")
        if self.seed_block < 0 or (self.seed_block and self.prompts_per_step % self.seed_block):
            raise ValueError(
                f"seed_block ({self.seed_block}) must divide prompts_per_step "
                f"({self.prompts_per_step}), or be 0"
            )
        if self.device not in ("cpu", "auto"):
            raise ValueError(f"device must be cpu or auto, got {self.device!r}")
        if self.tis_cap < 0:
            raise ValueError("tis_cap must be >= 0 (0 switches truncated importance sampling off)")
        lora.check(self.lora_rank, self.lora_alpha, self.lora_targets)
        ADVANTAGES.get(self.advantage)
        POLICY_LOSSES.get(self.loss)
        KL_ESTIMATORS.get(self.kl_estimator)
        KL_PLACEMENTS.get(self.kl_placement)
        GROUP_FILTERS.get(self.group_filter)
        OVERLONG.get(self.overlong)
        self.loss_config()
        self.overlong_config()
        OPTIMIZERS.get(self.optimizer)
        TASKS.get(self.task)
        ENGINES.get(self.engine)
        LOGGERS.get(self.log)
        self.reward_weights()

    def reward_weights(self) -> dict[str, float]:
        weights: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in self.reward.split(","))):
            name, _, w = part.partition("=")
            try:
                weights[name.strip()] = float(w) if w else 1.0
            except ValueError as e:
                raise ValueError(f"reward {part!r}: weight must be a number") from e
            REWARDS.get(name.strip())
        if not weights:
            raise ValueError("reward: give at least one name=weight pair")
        return weights

    def updates_per_batch(self) -> int:
        return self.minibatches * self.epochs

    def loss_config(self, kl_coef: float | None = None) -> LossConfig:
        """The loss settings; ``kl_coef`` overrides β (0 when the KL sits in the reward)."""
        low, high = default_clip(POLICY_LOSSES.get(self.loss))
        return LossConfig(
            low if self.eps_low is None else self.eps_low,
            high if self.eps_high is None else self.eps_high,
            self.kl_coef if kl_coef is None else kl_coef,
            self.max_new_tokens,
        )

    def overlong_config(self) -> OverlongConfig:
        return OverlongConfig(self.max_new_tokens, self.overlong_buffer, self.overlong_penalty)


OPTIMIZERS = Registry("optimizer")


@OPTIMIZERS.register("adamw")
def _adamw(params, cfg: ZeroConfig) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters (a small but free gain on CPU too)
    return torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=True
    )


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: ZeroConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


# --- helpers used by the loop ------------------------------------------------------------
def _step_rng(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """Per-step RNGs derived from (seed, step): a resumed run draws exactly what it would have."""
    mixed = seed * 1_000_003 + step
    return random.Random(mixed), torch.Generator().manual_seed(mixed)


def _write_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln and json.loads(ln).get("step", 0) <= max_step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))


def _resolve_run_dir(cfg: ZeroConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.resume:
        runs = sorted(Path("runs").glob("zero-*"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError("--resume: no runs/zero-* directory found; pass --out DIR")
        return runs[-1]
    return Path("runs") / f"zero-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Rollout:
    """One rollout batch: B = P*G rows, consecutive rows of a group share a prompt."""

    problems: list[Problem]
    prompts: list[list[int]]  # B prompt id lists
    gen: Generated  # completions: ids, texts, lengths, sampler log-probs, finish reasons
    rb: RewardBatch | None = None  # their rewards, once scored

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: list[int]) -> Rollout:
        """The given rows, in order (e.g. the groups a filter kept)."""
        g, rb = self.gen, self.rb
        return Rollout(
            [self.problems[r] for r in rows],
            [self.prompts[r] for r in rows],
            Generated(*([getattr(g, f)[r] for r in rows] for f in _GEN_FIELDS)),
            None
            if rb is None
            else RewardBatch(
                [rb.total[r] for r in rows],
                {k: [v[r] for r in rows] for k, v in rb.components.items()},
                dict(rb.errors),
                [rb.parse_fail[r] for r in rows],
                [rb.correct[r] for r in rows],
            ),
        )

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """Rows of several scored rollouts, one after another (reward errors are summed)."""
        rbs = [p.rb for p in parts if p.rb is not None]
        return Rollout(
            [x for p in parts for x in p.problems],
            [x for p in parts for x in p.prompts],
            Generated(*([x for p in parts for x in getattr(p.gen, f)] for f in _GEN_FIELDS)),
            RewardBatch(
                [x for rb in rbs for x in rb.total],
                {k: [x for rb in rbs for x in rb.components[k]] for k in rbs[0].components},
                {k: sum(rb.errors[k] for rb in rbs) for k in rbs[0].errors},
                [x for rb in rbs for x in rb.parse_fail],
                [x for rb in rbs for x in rb.correct],
            )
            if rbs
            else None,
        )

    def logprobs(self, net, rows, temperature: float, pad_id: int, entropy: bool = False):
        """Trainer log-probs (b, Lc) of `rows`, padded to the longest completion among `rows`
        (Lc <= the batch's width: a full-batch tensor sliced to ``[:, :Lc]`` lines up)."""
        return completion_logprobs(
            net,
            [self.prompts[r] for r in rows],
            [self.gen.ids[r] for r in rows],
            temperature,
            pad_id,
            entropy,
        )

    def sampler_logprobs(self, rows, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        for j, r in enumerate(rows):
            out[j, : len(self.gen.logprobs[r])] = torch.tensor(self.gen.logprobs[r])
        return out


_GEN_FIELDS = ("texts", "lengths", "ids", "logprobs", "finish")


def policy_update(
    model,
    optimizer,
    accelerator: Accelerator,
    batch: Rollout,
    adv: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    in_loss: torch.Tensor,
    loss_cfg: LossConfig,
    cfg: ZeroConfig,
    gen: torch.Generator,
    pad_id: int,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """M minibatches x μ epochs over one rollout batch: one optimizer step per minibatch.

    ``old_logp`` (B, Lc) is the policy before the first update (None: exactly one update, so the
    current log-probs, detached, are used: ratio 1, identical gradient). ``in_loss`` (B,) bool
    drops whole completions from the loss (overlong masking). A minibatch is split into
    micro-batches of ``cfg.micro_batch`` sequences (0: one group of ``cfg.group_size`` when it
    divides the minibatch) whose gradients accumulate; every call gets the whole minibatch's
    :class:`Norm`, so the gradient does not depend on the split. Each micro-batch is padded
    only to its own longest completion (``old_logp``/``ref_logp`` are sliced to that width),
    and a minibatch's rows are taken in batch order, so a group's rows stay together and share
    one prompt forward.

    With several processes every rank holds the whole batch and takes its contiguous share of
    each minibatch (``ranks.piece``). The ``Norm`` is still the whole minibatch's, and each
    rank's loss is multiplied by W because DDP averages gradients over ranks, so the synced
    gradient is the one-process gradient. Ranks with fewer micro-batches add zero-weight passes,
    so all make the same number of forward/backward calls; only the last call of a minibatch
    syncs gradients. The returned statistics are summed over ranks before they are averaged.
    """
    ranks = ranks or Ranks()
    loss_fn = POLICY_LOSSES.get(cfg.loss)
    kl_fn = KL_ESTIMATORS.get(cfg.kl_estimator)
    per_seq_clip = getattr(loss_fn, "sequence_level", False)
    device = next(model.parameters()).device
    adv, in_loss = adv.to(device), in_loss.to(device)
    old_logp = old_logp.to(device) if old_logp is not None else None
    ref_logp = ref_logp.to(device) if ref_logp is not None else None
    B = len(batch)
    stats: dict[str, list[float]] = {
        k: [] for k in ("loss", "clip_frac", "kl", "entropy", "grad_norm", "tis_weight")
    }
    mismatch, n_tokens = None, 0.0
    mb = B // cfg.minibatches
    micro = min(cfg.micro_batch, mb) or (cfg.group_size if mb % cfg.group_size == 0 else mb)
    mis_sum, mis_n = 0.0, 0.0
    skip = (
        (adv == 0).tolist()
        if cfg.skip_zero_adv and ref_logp is None and getattr(loss_fn, "advantage_only", False)
        else [False] * B
    )
    n_live = 0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(B, generator=gen) if cfg.minibatches > 1 else torch.arange(B)
        for m in range(cfg.minibatches):
            # batch order inside a minibatch: same rows (same gradient), groups kept together
            rows = sorted(order[m * mb : (m + 1) * mb].tolist())
            norm = Norm(
                seqs=float(len(rows)),
                tokens=max(1.0, float(sum(batch.gen.lengths[r] for r in rows if in_loss[r]))),
            )
            # rows that add exactly 0 to the gradient need no forward (cfg.skip_zero_adv)
            live = [r for r in rows if not skip[r]]
            n_live += len(live)
            mine = [live[i] for i in ranks.piece(len(live))]
            chunks: list[list[int] | None] = [
                mine[c : c + micro] for c in range(0, len(mine), micro)
            ]
            n_calls = max(-(-len(ranks.piece(len(live), r)) // micro) for r in range(ranks.world))
            chunks += [None] * (n_calls - len(chunks))  # zero-weight passes, see the docstring
            # [loss, clip units x frac, units, kl x tokens, entropy x tokens, tokens, tis x tokens]
            sums = [0.0] * 7
            for c, chunk in enumerate(chunks):
                weight = float(ranks.world) if chunk is not None else 0.0
                chunk = chunk if chunk is not None else rows[:1]
                idx = torch.tensor(chunk, device=device)
                sync = accelerator.no_sync(model) if c < len(chunks) - 1 else nullcontext()
                with sync:
                    logp, mask, ent = batch.logprobs(
                        model, chunk, cfg.temperature, pad_id, entropy=True
                    )  # (b, Lc) each, Lc = this chunk's longest completion
                    Lc = logp.shape[1]
                    mask = mask * in_loss[idx].unsqueeze(1).to(mask.dtype)  # (b, Lc)
                    old = old_logp[idx, :Lc] if old_logp is not None else logp.detach()
                    kl = kl_fn(logp, ref_logp[idx, :Lc]) if ref_logp is not None else None
                    # sampler log-probs: needed for TIS, and for the mismatch diagnostic (first
                    # minibatch only); not rebuilt for every micro-batch otherwise
                    need_samp = cfg.tis_cap > 0 or mismatch is None
                    samp = batch.sampler_logprobs(chunk, logp) if need_samp else None  # (b, Lc)
                    pg_logp, tis = logp, None
                    if cfg.tis_cap > 0:  # same values, policy-gradient term weighted per token
                        tis = tis_weights(old, samp, mask, cfg.tis_cap)  # (b, Lc)
                        pg_logp = scale_grad(logp, tis)
                    loss, st = loss_fn(pg_logp, old, adv[idx], mask, loss_cfg, kl, norm)
                    accelerator.backward(loss * weight)
                if weight == 0.0:
                    continue
                # clip_frac is over sequences for a sequence-level loss (gspo), else tokens
                units = float(mask.any(dim=1).sum() if per_seq_clip else mask.sum())
                tok = float(mask.sum())
                sums[0] += loss.item()
                sums[1] += st["clip_frac"] * units
                sums[2] += units
                sums[3] += st["kl"] * tok
                sums[4] += masked_mean(ent, mask).item() * tok
                sums[5] += tok
                sums[6] += (masked_mean(tis, mask).item() if tis is not None else 1.0) * tok
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
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, clip, units, kl_w, ent_w, tok, tis_w = ranks.sum(sums)
            n_tokens += tok
            stats["loss"].append(loss_sum)
            # weighted over the micro-batches (and ranks) by what each mean is over
            stats["clip_frac"].append(clip / max(units, 1.0))
            stats["kl"].append(kl_w / max(tok, 1.0))
            stats["entropy"].append(ent_w / max(tok, 1.0))
            stats["tis_weight"].append(tis_w / max(tok, 1.0))
            stats["grad_norm"].append(float("nan") if grad_norm is None else float(grad_norm))
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["sampler_mismatch"] = mismatch if mismatch is not None else 0.0
    out["train_tokens"] = int(n_tokens)
    out["train_rows_frac"] = n_live / max(1, B * cfg.epochs)
    return out


def sample_groups(
    engine: Engine,
    tokenizer,
    task,
    cfg: ZeroConfig,
    rng: random.Random,
    gen: torch.Generator,
    exclude,
    params: SamplingParams,
    weights: dict[str, float],
    ranks: Ranks | None = None,
) -> tuple[Rollout, Rollout, dict[str, int]]:
    """Rollout and reward for P fresh prompts x G samples, refilled while the group filter
    drops groups (DAPO dynamic sampling), for at most ``cfg.max_sampling_rounds`` rounds.

    Every rank draws the same P problems from ``rng``; they are cut into seed blocks
    (``cfg.seed_block`` prompts each), block b of round k is sampled under a generator seeded
    by (one draw from ``gen``, k, b) on the rank it is dealt to, scored there, and the scored
    blocks are gathered in block order, so every rank returns the same batch, equal to what
    one process would sample.

    Returns the batch to train on (at most P groups; fewer when the cap is hit), everything
    sampled this step (for unbiased rollout metrics), and the round and drop counts.
    """
    ranks = ranks or Ranks()
    keep_fn = GROUP_FILTERS.get(cfg.group_filter)
    G, P = cfg.group_size, cfg.prompts_per_step
    blocks = seed_blocks(P, cfg.seed_block or default_seed_block(P, ranks.world))
    base_seed = int(torch.randint(0, 2**62, (1,), generator=gen))  # same on every rank
    rounds, dropped, kept, everything = 0, 0, [], []
    while len(kept) < P and rounds < cfg.max_sampling_rounds:
        rounds += 1
        problems = [sample_excluding(task, rng, exclude) for _ in range(P)]
        prompt_ids = encode_prompts(tokenizer, problems)
        mine = []
        for b in ranks.piece(len(blocks)):
            rows = [i for i in blocks[b] for _ in range(G)]  # prompt index of each row
            block = Rollout(
                [problems[i] for i in rows],
                [prompt_ids[i] for i in rows],
                generate(
                    None,
                    tokenizer,
                    [prompt_ids[i] for i in rows],
                    params,
                    seeded_generator(base_seed, rounds, b),
                    engine=engine,
                ),
            )
            block.rb = score(block.problems, block.gen.texts, weights)
            mine.append(block)
        part = Rollout.concat([blk for theirs in ranks.gather(mine) for blk in theirs])
        everything.append(part)
        keep = keep_fn(torch.tensor(part.rb.total), G)  # (P,)
        dropped += int((~keep).sum())
        kept += [(part, i) for i in range(cfg.prompts_per_step) if keep[i]]
    kept = kept[: cfg.prompts_per_step]
    if not kept:  # every group was dropped: train on the last round (zero advantage anyway)
        kept = [(everything[-1], i) for i in range(cfg.prompts_per_step)]
    train = Rollout.concat([part.select(list(range(i * G, (i + 1) * G))) for part, i in kept])
    return (
        train,
        Rollout.concat(everything),
        {"sampling_rounds": rounds, "groups_dropped": dropped, "groups_trained": len(kept)},
    )


def default_seed_block(prompts: int, world: int) -> int:
    """The largest divisor of ``prompts`` that gives every one of ``world`` ranks a block."""
    return max(
        d for d in range(1, prompts + 1) if prompts % d == 0 and d * min(world, prompts) <= prompts
    )


def rollout_metrics(
    batch: Rollout, group_size: int, reversed_digits: bool = False
) -> dict[str, Any]:
    """Rollout figures of a scored batch (rewards before any overlong or KL shaping)."""
    B = len(batch)
    g, rb = batch.gen, batch.rb
    rewards = torch.tensor(rb.total)
    lens = length_stats(g.lengths)
    return {
        "reward": sum(rb.total) / B,
        **{f"reward/{k}": sum(v) / B for k, v in rb.components.items()},
        "reward_errors": sum(rb.errors.values()),
        "accuracy": sum(rb.correct) / B,
        "format_rate": sum(
            rb.components["format"]
            if "format" in rb.components
            else [format_reward(p, t) for p, t in zip(batch.problems, g.texts)]
        )
        / B,
        "parse_fail_rate": sum(rb.parse_fail) / B,
        "constant_groups": count_constant_groups(rewards, group_size),
        "len_mean": lens["mean"],
        "len_p90": lens["p90"],
        "truncated_rate": g.finish.count("length") / B,
        "reflection_rate": sum(map(has_reflection, g.texts)) / B,
        "self_correction_rate": sum(map(is_self_correction, g.texts)) / B,
        "step_accuracy": step_accuracy(g.texts, reversed_digits),
        "mixing_rate": mixing_rate(g.texts),
    }


# --- the stage ----------------------------------------------------------------------------
def lr_factor(cfg: ZeroConfig, s: int) -> float:
    """Learning-rate multiplier for step ``s`` (0-based): linear warm-up, then 1, then a linear
    decay that reaches 1/lr_decay on the last step."""
    return warmup_linear_decay(s, cfg.warmup, cfg.steps, cfg.lr_decay)


def sharded_logprobs(net, batch: Rollout, temperature: float, pad_id: int, ranks: Ranks):
    """No-grad log-probs (B, Lc) of every row, each rank computing its contiguous share.

    ``net`` is the bare module (no DDP wrapper): no collective runs inside, so ranks with
    different shares never wait on each other."""
    width = max(1, max(len(c) for c in batch.gen.ids))  # Lc: the batch's longest completion
    mine = list(ranks.piece(len(batch)))
    device = next(net.parameters()).device
    part = torch.zeros((0, width), device=device)
    if mine:
        part, _, _ = completion_logprobs(
            net,
            [batch.prompts[r] for r in mine],
            [batch.gen.ids[r] for r in mine],
            temperature,
            pad_id,
            width=width,
        )  # (b, Lc)
    parts = ranks.gather(part.detach().float().cpu())
    return torch.cat(parts).to(device)  # (B, Lc)


def zero(cfg: ZeroConfig, console: Console | None = None) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.device, cfg.bf16)
    ranks = Ranks.current()
    console = (console or Console()) if ranks.main else Console(quiet=True)
    share_threads(cfg.threads)
    t_start = time.time()
    run = Path(ranks.broadcast(str(_resolve_run_dir(cfg))))  # rank 0's timestamp everywhere
    ckpt_root = run / "checkpoints"
    resume_from = checkpoint.latest(ckpt_root) if cfg.resume else None
    if cfg.resume and resume_from is None:
        console.print(f"[yellow]--resume: no checkpoint in {ckpt_root}; starting from step 0.")
    claim_run_dir(run, cfg.resume, resume_from, ranks)
    logger = NullLogger()
    if ranks.main:
        cfglib.save_yaml(cfg, run / "config.yaml")
        logger = make_logger(cfg.log, run, cfglib.to_dict(cfg))

    with ranks.main_first():  # rank 0 builds the embedded model on first use, the rest reuse it
        base_path = ensure_base_model(
            cfg.model, cfg.task, cfg.pretrain_recipe, cfg.threads, console
        )
    task = get_task(cfg.task)
    tokenizer = load_tokenizer(base_path)
    pad_id = tokenizer.pad_token_id
    model = lora.load_policy(
        base_path, resume_from, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets
    ).to(accelerator.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # rollouts and evaluations; with LoRA an engine that decodes a module in this process gets a
    # merged copy (one matmul per projection), others (vLLM) the adapted model for its path
    sampler = lora.sampling_model(model)
    if lora.is_lora(model) and getattr(ENGINES.get(cfg.engine), "decodes_module", False):
        sampler = lora.merged_copy(model, base_path)
    engine = make_engine(cfg.engine, sampler, tokenizer)
    weights = cfg.reward_weights()
    adv_fn = ADVANTAGES.get(cfg.advantage)
    kl_fn = KL_ESTIMATORS.get(cfg.kl_estimator)
    placement = KL_PLACEMENTS.get(cfg.kl_placement)
    needs_old = getattr(placement, "needs_policy_logp", False)
    overlong_fn, overlong_cfg = OVERLONG.get(cfg.overlong), cfg.overlong_config()
    rollout_params = SamplingParams(
        cfg.temperature, cfg.top_p, 0, cfg.max_new_tokens, stop_ids(tokenizer)
    )
    exclude = excluded(cfg.task)
    held = heldout(cfg.task, cfg.heldout_n)
    with_real = cfg.real_eval and cfg.task.startswith("countdown")

    pre = _pretrain_meta(base_path)
    # notation of the reasoning's numbers (read by step_accuracy)
    reverse = bool(pre.get("config", {}).get("reversed_digits"))

    def run_eval(problems, seed_offset: int, k: int = cfg.eval_k, greedy: bool = True):
        return evaluate(
            model,
            tokenizer,
            problems,
            k=k,
            greedy=greedy,
            temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed + seed_offset,
            engine=engine,
            reversed_digits=reverse,
        ).summary

    def real_eval() -> dict[str, Any]:
        rows = list(real_countdown())
        by_n = {n: [p for p in rows if len(p.fields["nums"]) == n] for n in (3, 4)}
        return {
            f"{n}_numbers": run_eval(ps, 7, k=cfg.real_k, greedy=False) for n, ps in by_n.items()
        }

    # Before training: the bar to clear, and the base model's own figures (computed once, on
    # rank 0; the other ranks wait at their first collective).
    base_file = run / "base_eval.json"
    base: dict[str, Any] = {}
    if not ranks.main:
        pass
    elif base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        console.print(
            f"[bold]Run:[/] {run}   [bold]model:[/] {base_path} ({n_params(model):,} parameters)"
        )
        console.print(
            "Measuring the constant-template baseline and the base model on held-out problems..."
        )
        base = {
            "template_baseline": template_baseline(held),
            "heldout": run_eval(held, 0),
            # step 0 of the periodic curve: the same problems and seed scheme as every later
            # `eval/` row, so a curve is compared with its own start (report.dynamics)
            "periodic": run_eval(held[: cfg.eval_n], 1000)
            if cfg.eval_every and cfg.eval_n < len(held)
            else None,
            "real": real_eval() if with_real else None,
            **{k: pre[k] for k in ("corpus_accuracy", "corpus_format_rate") if k in pre},
        }
        base_file.write_text(json.dumps(base, indent=1))
    if ranks.main:
        tb = base["template_baseline"]
        console.print(
            f"constant-template baseline ({tb['best']}): {tb['best_acc']:.3f}   "
            f"base pass@1: {base['heldout']['pass1']:.3f}"
        )

    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = OPTIMIZERS.get(cfg.optimizer)(trainable, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    ref_model = None
    if cfg.kl_coef > 0:  # frozen copy of the starting policy (or the last refreshed one)
        ref_dir = (
            resume_from / "reference"
            if resume_from and (resume_from / "reference").exists()
            else base_path
        )
        ref_model = load_model(ref_dir).eval().requires_grad_(False).to(accelerator.device)
    policy = accelerator.unwrap_model(model)  # the bare module: sampling and no-grad forwards

    step = 0
    if resume_from is not None:
        step = checkpoint.load_trainer_state(resume_from, optimizer, scheduler)["step"]
        console.print(f"[bold]Resuming[/] {run} from step {step}")
    metrics_path, samples_path = run / "metrics.jsonl", run / "samples.jsonl"
    if ranks.main:
        _truncate_jsonl(metrics_path, step)
        _truncate_jsonl(samples_path, step)

    def save(at_step: int) -> None:
        if not ranks.main:  # one copy: weights and optimizer state are the same on every rank
            return
        path = checkpoint.save(
            ckpt_root,
            at_step,
            accelerator.unwrap_model(model),
            tokenizer,
            optimizer,
            scheduler,
            {"run": str(run)},
            cfg.keep_checkpoints,
        )
        if ref_model is not None and cfg.ref_refresh:
            ref_model.save_pretrained(str(path / "reference"))

    def on_sigterm(signum, frame):  # `kill` behaves like Ctrl-C: save, then exit
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = False
    try:
        with progress_bar(console) as bar:
            bar_id = bar.add_task("aha zero", total=cfg.steps, completed=step, info="")
            while step < cfg.steps:
                t0 = time.time()
                rng, gen = _step_rng(cfg.seed, step)

                # 1. rollout: G completions for each of P fresh training prompts (refilled
                #    while the group filter drops groups); 2. reward: every component kept
                batch, sampled, sampling = sample_groups(
                    engine, tokenizer, task, cfg, rng, gen, exclude, rollout_params, weights, ranks
                )
                t_rollout = time.time() - t0
                rewards = torch.tensor(batch.rb.total)  # (B,)
                lengths = torch.tensor(batch.gen.lengths)  # (B,)
                truncated = torch.tensor([f == "length" for f in batch.gen.finish])  # (B,)
                rewards, in_loss = overlong_fn(rewards, lengths, truncated, overlong_cfg)

                # 3. reference: old-policy and reference log-probs, only where needed; the KL
                #    placement may move the penalty into the reward
                t1 = time.time()
                old_logp = ref_logp = kl_tok = None
                comp_mask = right_pad(batch.gen.ids, pad_id)[1]  # (B, Lc)
                with torch.no_grad():
                    if cfg.updates_per_batch() > 1 or (ref_model is not None and needs_old):
                        old_logp = sharded_logprobs(
                            policy, batch, cfg.temperature, pad_id, ranks
                        )  # (B, Lc)
                    if ref_model is not None:
                        ref_logp = sharded_logprobs(
                            ref_model, batch, cfg.temperature, pad_id, ranks
                        )  # (B, Lc)
                        if needs_old:
                            kl_tok = kl_fn(old_logp, ref_logp)  # (B, Lc)
                        rewards, loss_kl = placement(rewards, kl_tok, comp_mask, cfg.kl_coef)
                    else:
                        loss_kl = 0.0

                # 4. advantage: group-relative; a constant group gets exactly 0
                adv = adv_fn(rewards, cfg.group_size)  # (B,)

                # 5. loss and optimizer steps
                model.train()
                upd = policy_update(
                    model,
                    optimizer,
                    accelerator,
                    batch,
                    adv,
                    old_logp,
                    ref_logp,
                    in_loss,
                    cfg.loss_config(kl_coef=loss_kl),
                    cfg,
                    gen,
                    pad_id,
                    ranks,
                )
                scheduler.step()
                engine.sync_weights(lora.sampling_model(policy))  # no-op in-process
                if ref_model is not None and cfg.ref_refresh and (step + 1) % cfg.ref_refresh == 0:
                    ref_model.load_state_dict(lora.merged_state_dict(policy))
                t_train = time.time() - t1
                step += 1

                # 6. log (rollout figures over everything sampled this step)
                row = {"step": step, **rollout_metrics(sampled, cfg.group_size, reverse)}
                row.update(sampling, overlong_masked=int((~in_loss).sum()))
                row.update({k: v for k, v in upd.items() if k != "train_tokens"})
                row.update(
                    lr=scheduler.get_last_lr()[0],
                    rollout_tok_s=sum(sampled.gen.lengths) / max(t_rollout, 1e-9),
                    train_tok_s=upd["train_tokens"] * 1.0 / max(t_train, 1e-9),
                    step_s=time.time() - t0,
                )
                if ranks.main:  # rank 0 evaluates, logs and writes samples
                    if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                        ev = run_eval(held[: cfg.eval_n], 1000 + step)
                        row.update({f"eval/{k}": v for k, v in ev.items()})
                    _write_jsonl(metrics_path, row)
                    logger.log(step, row)
                    for i in range(min(cfg.samples_per_step, len(batch) // cfg.group_size)):
                        j = i * cfg.group_size
                        _write_jsonl(
                            samples_path,
                            {
                                "step": step,
                                "problem": batch.problems[j].question,
                                "completion": batch.gen.texts[j],
                                "reward": batch.rb.total[j],
                                "correct": batch.rb.correct[j],
                            },
                        )
                bar.update(
                    bar_id,
                    advance=1,
                    info=f"reward {row['reward']:.2f}  acc {row['accuracy']:.2f}  len {row['len_mean']:.0f}",
                )

                # 7. checkpoint
                if cfg.save_every and step % cfg.save_every == 0:
                    save(step)
    except KeyboardInterrupt:
        interrupted = True
        save(step)
        console.print(
            f"[yellow]Interrupted: saved step {step}. Resume with: aha zero --out {run} --resume"
        )
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        logger.close()
    if interrupted:
        raise SystemExit(130)

    summary: dict[str, Any] = {}
    if ranks.main:  # the other ranks wait for the summary at the broadcast below
        summary = _finish(
            cfg, run, base_path, policy, tokenizer, base, held, run_eval, real_eval, t_start
        )
        print_summary(summary, console)
    return ranks.broadcast(summary)


def _finish(
    cfg, run, base_path, policy, tokenizer, base, held, run_eval, real_eval, t_start
) -> dict[str, Any]:
    """Rank 0: the final model (LoRA merged into plain HF weights), its evaluation, summary.json."""
    lora.save_merged(policy, tokenizer, run / "final")
    trained = run_eval(held, 0)
    tb = base["template_baseline"]
    with_real = base.get("real") is not None
    summary = {
        "base": base["heldout"],
        "trained": trained,
        "heldout_n": len(held),
        "template_baseline": tb["best_acc"],
        "template_baseline_name": tb["best"],
        "corpus_accuracy": base.get("corpus_accuracy"),
        "real_countdown": {"base": base["real"], "trained": real_eval()} if with_real else None,
        "steps": cfg.steps,
        "wall_s": round(time.time() - t_start, 1),
        "model": str(base_path),
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _pretrain_meta(model_dir: Path) -> dict[str, Any]:
    """What `aha pretrain` recorded about a base model ({} for any other model)."""
    meta = Path(model_dir) / "ahamoment_pretrain.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def print_summary(summary: dict[str, Any], console: Console) -> None:
    b, t = summary["base"], summary["trained"]
    s = b["settings"]
    table = Table(
        title=f"Held-out {summary['heldout_n']} problems "
        f"(T={s['temperature']}, top-p={s['top_p']}, k={s['k']})"
    )
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("trained", justify="right")
    for key, label in [
        ("greedy_acc", "greedy accuracy"),
        ("pass1", f"pass@1 (mean of {s['k']})"),
        ("passk", f"pass@{s['k']}"),
        ("consk", f"cons@{s['k']}"),
        ("format_rate", "format rate"),
        ("mean_len", "mean length (tokens)"),
        ("reflection_rate", "reflection rate"),
        ("self_correction_rate", "self-correction rate"),
    ]:
        table.add_row(label, f"{b[key]:.3f}", f"{t[key]:.3f}")
    table.add_row("constant-template baseline", f"{summary['template_baseline']:.3f}", "")
    if summary.get("corpus_accuracy") is not None:
        table.add_row("pretraining corpus accuracy", f"{summary['corpus_accuracy']:.3f}", "")
    real = summary.get("real_countdown")
    if real:
        for n in ("3_numbers", "4_numbers"):
            table.add_row(
                f"real Countdown {n.replace('_', ' ')} pass@1",
                f"{real['base'][n]['pass1']:.3f}",
                f"{real['trained'][n]['pass1']:.3f}",
            )
    console.print(table)
    console.print(f"wall time {summary['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("zero", argv)


if __name__ == "__main__":
    raise SystemExit(main())
