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
  detached (ratio 1, identical gradient). The sampler's own log-probs are only a diagnostic.
"""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table

from ahamoment import checkpoint
from ahamoment import config as cfglib
from ahamoment.data import sample_excluding
from ahamoment.evaluation import (
    Generated,
    encode_prompts,
    evaluate,
    generate,
    stop_ids,
    template_baseline,
)
from ahamoment.logging_backends import LOGGERS, make_logger
from ahamoment.logprobs import completion_logprobs
from ahamoment.metrics import has_reflection, is_self_correction, length_stats, step_accuracy
from ahamoment.models import load_model, load_tokenizer, n_params, set_threads
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
from ahamoment.rollout import ENGINES, Engine, SamplingParams, make_engine
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
    """Learning rate (constant after warm-up)."""
    warmup: int = 5
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    minibatches: int = 1
    """M: optimizer steps per rollout batch per epoch (DeepSeek-R1 used 16)."""
    epochs: int = 1
    """μ: passes over each rollout batch."""
    micro_batch: int = 0
    """Sequences per forward/backward inside a minibatch (gradient accumulation), each padded to its own longest completion; 0: one group (group_size rows, one prompt) when it divides the minibatch, else the whole minibatch."""
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
    """torch CPU threads; 0 uses every core this process may run on."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages compare samples in a group")
        batch = self.prompts_per_step * self.group_size
        if self.minibatches < 1 or batch % self.minibatches:
            raise ValueError(
                f"minibatches ({self.minibatches}) must divide prompts_per_step x group_size ({batch})"
            )
        if self.heldout_n < 1 or self.eval_n < 1 or self.eval_k < 1:
            raise ValueError("heldout_n, eval_n and eval_k must be positive")
        if self.micro_batch < 0 or (
            self.micro_batch and (batch // self.minibatches) % self.micro_batch
        ):
            raise ValueError(
                f"micro_batch ({self.micro_batch}) must divide the minibatch "
                f"({batch // self.minibatches} sequences), or be 0"
            )
        if self.max_sampling_rounds < 1:
            raise ValueError("max_sampling_rounds must be at least 1")
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
    """
    loss_fn = POLICY_LOSSES.get(cfg.loss)
    kl_fn = KL_ESTIMATORS.get(cfg.kl_estimator)
    per_seq_clip = getattr(loss_fn, "sequence_level", False)
    B = len(batch)
    stats: dict[str, list[float]] = {
        k: [] for k in ("loss", "clip_frac", "kl", "entropy", "grad_norm")
    }
    mismatch, n_tokens = None, 0
    mb = B // cfg.minibatches
    micro = cfg.micro_batch or (cfg.group_size if mb % cfg.group_size == 0 else mb)
    mis_sum, mis_n = 0.0, 0.0
    for _epoch in range(cfg.epochs):
        order = torch.randperm(B, generator=gen) if cfg.minibatches > 1 else torch.arange(B)
        for m in range(cfg.minibatches):
            # batch order inside a minibatch: same rows (same gradient), groups kept together
            rows = sorted(order[m * mb : (m + 1) * mb].tolist())
            norm = Norm(
                seqs=float(len(rows)),
                tokens=max(1.0, float(sum(batch.gen.lengths[r] for r in rows if in_loss[r]))),
            )
            loss_sum, parts = 0.0, []
            for c in range(0, len(rows), micro):
                chunk = rows[c : c + micro]
                idx = torch.tensor(chunk)
                logp, mask, ent = batch.logprobs(
                    model, chunk, cfg.temperature, pad_id, entropy=True
                )  # (b, Lc) each, Lc = this chunk's longest completion
                Lc = logp.shape[1]
                mask = mask * in_loss[idx].unsqueeze(1).to(mask.dtype)  # (b, Lc)
                old = old_logp[idx, :Lc] if old_logp is not None else logp.detach()
                kl = kl_fn(logp, ref_logp[idx, :Lc]) if ref_logp is not None else None
                loss, st = loss_fn(logp, old, adv[idx], mask, loss_cfg, kl, norm)
                accelerator.backward(loss)
                loss_sum += loss.item()
                # clip_frac is over sequences for a sequence-level loss (gspo), else tokens
                units = mask.any(dim=1).sum() if per_seq_clip else mask.sum()
                parts.append((st, masked_mean(ent, mask).item(), float(mask.sum()), float(units)))
                if mismatch is None:  # sampler vs trainer log-probs, on-policy tokens only
                    samp = batch.sampler_logprobs(chunk, logp)
                    diff = (logp.detach() - samp).abs()
                    mis_sum += float(torch.where(mask.bool(), diff, 0.0).sum())
                    mis_n += float(mask.sum())
            if mismatch is None:  # over the first minibatch, before any update
                mismatch = mis_sum / max(mis_n, 1.0)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tok = sum(w for _, _, w, _ in parts)
            units = sum(u for *_, u in parts)
            n_tokens += int(tok)
            stats["loss"].append(loss_sum)
            # weighted over the micro-batches by what each mean is over
            stats["clip_frac"].append(
                sum(st["clip_frac"] * u for st, _, _, u in parts) / max(units, 1.0)
            )
            stats["kl"].append(sum(st["kl"] * w for st, _, w, _ in parts) / max(tok, 1.0))
            stats["entropy"].append(sum(e * w for _, e, w, _ in parts) / max(tok, 1.0))
            stats["grad_norm"].append(float(grad_norm))
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["sampler_mismatch"] = mismatch if mismatch is not None else 0.0
    out["train_tokens"] = n_tokens
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
) -> tuple[Rollout, Rollout, dict[str, int]]:
    """Rollout and reward for P fresh prompts x G samples, refilled while the group filter
    drops groups (DAPO dynamic sampling), for at most ``cfg.max_sampling_rounds`` rounds.

    Returns the batch to train on (at most P groups; fewer when the cap is hit), everything
    sampled this step (for unbiased rollout metrics), and the round and drop counts.
    """
    keep_fn = GROUP_FILTERS.get(cfg.group_filter)
    G = cfg.group_size
    rounds, dropped, kept, everything = 0, 0, [], []
    while len(kept) < cfg.prompts_per_step and rounds < cfg.max_sampling_rounds:
        rounds += 1
        problems = [sample_excluding(task, rng, exclude) for _ in range(cfg.prompts_per_step)]
        prompt_ids = encode_prompts(tokenizer, problems)
        part = Rollout(
            [p for p in problems for _ in range(G)],
            [ids for ids in prompt_ids for _ in range(G)],
            generate(
                None,
                tokenizer,
                [ids for ids in prompt_ids for _ in range(G)],
                params,
                gen,
                engine=engine,
            ),
        )
        part.rb = score(part.problems, part.gen.texts, weights)
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


def rollout_metrics(batch: Rollout, group_size: int) -> dict[str, Any]:
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
        "step_accuracy": step_accuracy(g.texts),
    }


# --- the stage ----------------------------------------------------------------------------
def zero(cfg: ZeroConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    set_threads(cfg.threads)
    t_start = time.time()
    run = _resolve_run_dir(cfg)
    ckpt_root = run / "checkpoints"
    resume_from = checkpoint.latest(ckpt_root) if cfg.resume else None
    if cfg.resume and resume_from is None:
        console.print(f"[yellow]--resume: no checkpoint in {ckpt_root}; starting from step 0.")
    if resume_from is None and run.exists() and any(p.name != "config.yaml" for p in run.iterdir()):
        if not cfg.resume:
            raise FileExistsError(
                f"{run} is not empty; pass --resume to continue it, or another --out"
            )
    run.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, run / "config.yaml")
    logger = make_logger(cfg.log, run, cfglib.to_dict(cfg))

    base_path = ensure_base_model(cfg.model, cfg.task, cfg.pretrain_recipe, cfg.threads, console)
    task = get_task(cfg.task)
    tokenizer = load_tokenizer(base_path)
    pad_id = tokenizer.pad_token_id
    model = load_model(resume_from or base_path)
    engine = make_engine(cfg.engine, model, tokenizer)  # rollouts and evaluations
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

    def run_eval(problems, seed_offset: int) -> dict[str, Any]:
        return evaluate(
            model,
            tokenizer,
            problems,
            k=cfg.eval_k,
            temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed + seed_offset,
            engine=engine,
        ).summary

    def real_eval() -> dict[str, Any]:
        rows = list(real_countdown())
        by_n = {n: [p for p in rows if len(p.fields["nums"]) == n] for n in (3, 4)}
        return {f"{n}_numbers": run_eval(ps, 7) for n, ps in by_n.items()}

    # Before training: the bar to clear, and the base model's own figures (computed once).
    base_file = run / "base_eval.json"
    if base_file.exists():
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
            "real": real_eval() if with_real else None,
            **_pretrain_facts(base_path),
        }
        base_file.write_text(json.dumps(base, indent=1))
    tb = base["template_baseline"]
    console.print(
        f"constant-template baseline ({tb['best']}): {tb['best_acc']:.3f}   "
        f"base pass@1: {base['heldout']['pass1']:.3f}"
    )

    accelerator = Accelerator(cpu=True)
    optimizer = OPTIMIZERS.get(cfg.optimizer)(model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup))
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    ref_model = None
    if cfg.kl_coef > 0:  # frozen copy of the starting policy (or the last refreshed one)
        ref_dir = (
            resume_from / "reference"
            if resume_from and (resume_from / "reference").exists()
            else base_path
        )
        ref_model = load_model(ref_dir).eval().requires_grad_(False)

    step = 0
    if resume_from is not None:
        step = checkpoint.load_trainer_state(resume_from, optimizer, scheduler)["step"]
        console.print(f"[bold]Resuming[/] {run} from step {step}")
    metrics_path, samples_path = run / "metrics.jsonl", run / "samples.jsonl"
    _truncate_jsonl(metrics_path, step)
    _truncate_jsonl(samples_path, step)

    def save(at_step: int) -> None:
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
                    engine, tokenizer, task, cfg, rng, gen, exclude, rollout_params, weights
                )
                t_rollout = time.time() - t0
                rewards = torch.tensor(batch.rb.total)  # (B,)
                lengths = torch.tensor(batch.gen.lengths)  # (B,)
                truncated = torch.tensor([f == "length" for f in batch.gen.finish])  # (B,)
                rewards, in_loss = overlong_fn(rewards, lengths, truncated, overlong_cfg)

                # 3. reference: old-policy and reference log-probs, only where needed; the KL
                #    placement may move the penalty into the reward
                t1 = time.time()
                everyone = list(range(len(batch)))
                old_logp = ref_logp = kl_tok = None
                with torch.no_grad():
                    if cfg.updates_per_batch() > 1 or (ref_model is not None and needs_old):
                        old_logp, comp_mask, _ = batch.logprobs(
                            model, everyone, cfg.temperature, pad_id
                        )  # (B, Lc)
                    if ref_model is not None:
                        ref_logp, comp_mask, _ = batch.logprobs(
                            ref_model, everyone, cfg.temperature, pad_id
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
                )
                scheduler.step()
                engine.sync_weights(accelerator.unwrap_model(model))  # no-op in-process
                if ref_model is not None and cfg.ref_refresh and (step + 1) % cfg.ref_refresh == 0:
                    ref_model.load_state_dict(accelerator.unwrap_model(model).state_dict())
                t_train = time.time() - t1
                step += 1

                # 6. log (rollout figures over everything sampled this step)
                row = {"step": step, **rollout_metrics(sampled, cfg.group_size)}
                row.update(sampling, overlong_masked=int((~in_loss).sum()))
                row.update({k: v for k, v in upd.items() if k != "train_tokens"})
                row.update(
                    lr=scheduler.get_last_lr()[0],
                    rollout_tok_s=sum(sampled.gen.lengths) / max(t_rollout, 1e-9),
                    train_tok_s=upd["train_tokens"] * 1.0 / max(t_train, 1e-9),
                    step_s=time.time() - t0,
                )
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

    policy = accelerator.unwrap_model(model)
    policy.save_pretrained(str(run / "final"))
    tokenizer.save_pretrained(str(run / "final"))
    trained = run_eval(held, 0)
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
    print_summary(summary, console)
    return summary


def _pretrain_facts(model_dir: Path) -> dict[str, Any]:
    meta = Path(model_dir) / "ahamoment_pretrain.json"
    if not meta.exists():
        return {}
    pre = json.loads(meta.read_text())
    return {k: pre.get(k) for k in ("corpus_accuracy", "corpus_format_rate")}


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
