"""`aha zero`: R1-Zero, i.e. GRPO straight on a base model with rule-based rewards only.

Each step: (1) sample G completions for each of P fresh prompts and score them (correctness
plus format; DAPO dynamic sampling refills dropped groups when a group filter is set); (2)
shape the rewards (overlong handler); (3) old-policy and reference log-probs where needed, and
the KL placement; (4) group-relative advantages; (5) one optimizer step per minibatch for μ
epochs; (6) log; (7) checkpoint. Held-out problems are evaluated before, every ``eval_every``
steps, and after. The parts are components (``rl/rollouts.py``, ``rl/update.py``) and every
variant is a registry entry in ``rl/``, never a branch here.

How this differs from GRPO as published (DeepSeekMath / DeepSeek-R1): the defaults train
rank-8 LoRA adapters held by a k2 KL at β 0.03, where R1 trains every weight with k3 at β
0.001, since a model of under a million parameters loses its sampled arithmetic when every
weight moves or the anchor is loose (docs/results/zero-countdown.md); the update's own
deviations are listed in ``rl/update.py``. Several processes (`accelerate launch`): rollouts
are sampled in seed blocks and gathered, every rank trains on its share of each minibatch, and
rank 0 logs, checkpoints and evaluates (``distributed.py``).

Rollout servers (``--rollout-server URL[,URL...]``): the rollouts and evaluations are sampled
by ``aha serve`` (or vLLM) processes apart from the trainer, which pushes its weights to them
after every step (``rollout/server_engine.py``). With ``--max-staleness K`` > 0 the steps
t+1 ... t+K are sampled while step t trains (``rl/pipeline.py``), and the loss corrects for
the older sampling weights with the importance weight of ``--tis-cap`` (``rl/tis.py``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ahamoment import lora, training
from ahamoment.args import HeldoutArgs, LoraArgs, ModelArgs, TrainArgs, check_groups
from ahamoment.base_models import pretrain_meta, reversed_digits
from ahamoment.decoder import kv_cache_dtype
from ahamoment.evaluation import HeldoutSet, template_baseline
from ahamoment.logging_backends import LOGGERS, NullLogger, make_logger
from ahamoment.models import load_model, n_params
from ahamoment.progress import progress_bar
from ahamoment.prompts import stop_ids
from ahamoment.rewards import parse_weights
from ahamoment.rl import (
    ADVANTAGES,
    GROUP_FILTERS,
    KL_ESTIMATORS,
    KL_PLACEMENTS,
    OVERLONG,
    POLICY_LOSSES,
    LossConfig,
    OverlongConfig,
    default_clip,
)
from ahamoment.rl.curriculum import CURRICULA, LEVEL_SETS, CurriculumSource, make_curriculum
from ahamoment.rl.pipeline import RolloutPipeline, StepSample
from ahamoment.rl.rollouts import (
    Rollout,
    RolloutSettings,
    rollout_metrics,
    sample_groups,
    step_rng,
)
from ahamoment.rl.tis import IMPORTANCE
from ahamoment.rl.update import OLD_LOGP, TrainBatch, UpdateSettings, anchor, policy_update
from ahamoment.rollout import ENGINES, SamplingParams, make_engine
from ahamoment.rollout.base import engine_stats
from ahamoment.rollout.server_engine import WEIGHT_SYNCS
from ahamoment.runs import interruptible, interrupts_deferred
from ahamoment.schedules import warmup_linear_decay
from ahamoment.server_protocol import API_KEY_ENV, WEIGHTS_KEY_ENV, state_sha
from ahamoment.splits import excluded


@dataclass
class ZeroConfig(HeldoutArgs, LoraArgs, TrainArgs, ModelArgs):
    """GRPO: rollouts, rewards, the policy update and periodic evaluation"""

    steps: int = 300
    """GRPO steps (rollout batches)."""
    prompts_per_step: int = 16
    """P: distinct prompts per rollout batch."""
    group_size: int = 8
    """G: completions sampled per prompt; advantages are relative within each group."""
    temperature: float = 1.0
    """Rollout sampling temperature (also divides the trainer's logits, so ratios match)."""
    top_p: float = 1.0
    """Rollout nucleus sampling."""
    engine: str = "torch"
    """Rollout engine (rollout/): torch (our KV-cache sampler, fused decoding step), torch-eager (plain torch ops), hf (transformers generate), vllm (GPU extra)."""
    kv_cache: str = "model"
    """What --engine torch or torch-eager keeps in its key/value cache: model (the model's dtype) or float16 (half floats: half the bytes for the decoding step's attention to read, which pays on long generations; each cached key and value is rounded once, which moves the sampler's log-probs by that rounding; they are then the behaviour policy's own, which --old-logp sampler takes)."""
    reward: str = "accuracy=1.0,format=1.0"
    """Weighted rewards as name=weight pairs; a name may be an import path pkg.mod:fn (weight 1 if omitted)."""
    advantage: str = "grpo"
    """Advantage estimator from rl/advantages.py: grpo, dr_grpo, rloo."""
    loss: str = "grpo"
    """Policy loss from rl/losses.py: grpo (sequence mean), dr_grpo (token sum / max_new_tokens), dapo (token mean), gspo (sequence ratio)."""
    lr_decay: int = 100
    """Decay the learning rate linearly to 0 over the last N steps (all of them when N >= steps); 0: constant after warm-up."""
    minibatches: int = 2
    """M: optimizer steps per rollout batch per epoch (DeepSeek-R1 used 16)."""
    epochs: int = 1
    """μ: passes over each rollout batch."""
    micro_batch: int = 64
    """Rows per forward/backward inside a minibatch (gradients accumulate; the update is the same); Llama-style models run them packed. 0: one group when it divides the minibatch; at least the minibatch's size: the whole minibatch."""
    skip_zero_adv: bool = True
    """With kl_coef 0: skip the forward and backward of rows whose advantage is exactly 0 (all-equal groups); the update is the same."""
    eps_low: float | None = None
    """Ratio clip below 1; empty: the loss's own (0.2; gspo 3e-4). R1's stage 1 used 10 (>= 1: no lower clip)."""
    eps_high: float | None = None
    """Ratio clip above 1; empty: the loss's own (0.2; dapo 0.28, gspo 4e-4)."""
    kl_coef: float = 0.03
    """β of the KL penalty to a frozen reference (0: no reference model, no reference forward)."""
    kl_estimator: str = "k2"
    """KL estimator from rl/kl.py: k1, k2, k3. R1 uses k3; k2's gradient is the true KL gradient."""
    kl_placement: str = "loss"
    """Where the KL acts (rl/kl.py): loss (per token, as R1 and TRL) or reward (r - β·Σ_t kl_t, as PPO-RLHF)."""
    ref_refresh: int = 0
    """Copy the policy into the reference every N steps (R1: 400); 0 never refreshes."""
    curriculum: str = "none"
    """Where training problems come from (rl/curriculum.py): none (the task, uniformly) or adaptive (difficulty levels of the task, the mix moved every step so that group accuracy stays near --curriculum-target; logged as curriculum/<level>)."""
    curriculum_target: float = 0.5
    """adaptive: the group accuracy the level mix aims at (0.5: most groups have both right and wrong answers)."""
    group_filter: str = "all"
    """Groups kept for training (rl/shaping.py): all, or nonconstant (DAPO dynamic sampling: refill dropped groups)."""
    max_sampling_rounds: int = 3
    """With a group filter: at most this many rounds of P prompts per step to refill the batch."""
    overlong: str = "soft"
    """Truncated completions (rl/shaping.py): none, mask (left out of the loss), soft (DAPO length penalty)."""
    overlong_buffer: int = 128
    """soft: the penalty ramps over the last N tokens of max_new_tokens."""
    overlong_penalty: float = 1.0
    """soft: the penalty at max_new_tokens (a correct answer earns 1)."""
    tis_cap: float = 0.0
    """Truncated importance sampling (rl/tis.py): weight each token's policy-gradient term by min(exp(old_logp - sampler_logp), C), for a sampler (vLLM, rollout servers, older weights) whose log-probs differ from the trainer's; 0: off."""
    importance: str = "truncate"
    """How the --tis-cap weight is bounded (rl/tis.py): truncate (TIS: min(w, C)) or mask (AReaL's decoupled objective: tokens with w > C leave the loss)."""
    old_logp: str = "auto"
    """Old-policy log-probs, needed with several optimizer steps per rollout batch (rl/update.py): forward (one no-grad forward of the policy before the first step), sampler (the log-probs the sampler drew each token with, no forward; only for a sampler of the current weights in this process: --engine torch, torch-eager or hf, no --rollout-server, no --tis-cap, no --bf16), auto (sampler where it may, else forward)."""
    rollout_server: str = ""
    """Comma-separated URLs of rollout servers (`aha serve --weights-key KEY`, see `aha launch`): rollouts and evaluations are sampled there, and the weights pushed to them after every step. Empty: sample in this process with --engine."""
    weights_key: str = ""
    """Bearer key for pushing weights to the rollout servers; empty: $AHA_WEIGHTS_KEY."""
    weight_sync: str = "aha"
    """How weights reach the rollout servers: aha (`aha serve`'s POST /v1/weights) or vllm (vLLM's weight transfer; GPU only, untested here)."""
    max_staleness: int = 0
    """K: with rollout servers, steps t+1 ... t+K are sampled while step t trains (asynchronous RL; needs --tis-cap); completions from weights more than K steps old are dropped and counted. 0: synchronous."""
    seed_block: int = 0
    """Prompts sampled together under one seed (rl/rollouts.py): every process count that divides P / seed_block samples the same completions. 0: P / processes (the fastest); 1: one seed per prompt (any process count, slower rollouts)."""
    eval_every: int = 100
    """Evaluate on eval_n held-out problems every N steps (0: only before and after)."""
    eval_n: int = 200
    """Held-out problems in the periodic evaluations."""
    eval_top_p: float = 1.0
    """Held-out nucleus sampling."""
    real_k: int = 1
    """Samples per real Countdown problem (at eval_temperature, no greedy pass)."""
    log: str = "jsonl"
    """Extra metrics logger besides metrics.jsonl: jsonl (none), tensorboard (pip install 'ahamoment[tensorboard]'), wandb (offline; only when installed)."""
    samples_per_step: int = 2
    """Completions written to samples.jsonl per step."""
    # shared-group defaults that differ for this stage (docs in args.py)
    lora_rank: int = 8
    heldout_n: int = 1000
    max_new_tokens: int = 192

    def __post_init__(self) -> None:
        check_groups(self)
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages compare samples in a group")
        batch = self.prompts_per_step * self.group_size
        if self.minibatches < 1 or self.epochs < 1 or batch % self.minibatches:
            raise ValueError(
                f"minibatches ({self.minibatches}) must divide prompts_per_step x group_size "
                f"({batch}), and epochs must be at least 1"
            )
        if min(self.heldout_n, self.eval_n, self.real_k) < 1:
            raise ValueError("heldout_n, eval_n, eval_k and real_k must be positive")
        mb = batch // self.minibatches
        if self.micro_batch < 0 or (0 < self.micro_batch < mb and mb % self.micro_batch):
            raise ValueError(
                f"micro_batch ({self.micro_batch}) must divide the minibatch "
                f"({mb} sequences), be at least its size, or be 0"
            )
        if self.lr_decay < 0 or self.max_sampling_rounds < 1 or self.tis_cap < 0:
            raise ValueError("lr_decay and tis_cap must be >= 0, max_sampling_rounds >= 1")
        if not 0 < self.curriculum_target < 1:
            raise ValueError(f"curriculum_target must be in (0, 1), got {self.curriculum_target}")
        if self.curriculum != "none":
            CURRICULA.get(self.curriculum)
            if self.task not in LEVEL_SETS:
                raise ValueError(
                    f"--curriculum {self.curriculum} needs a task with difficulty levels "
                    f"(rl/curriculum.py: {', '.join(LEVEL_SETS)}), not {self.task!r}"
                )
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.max_staleness and not self.rollout_server:
            raise ValueError(
                "--max-staleness samples ahead on rollout servers: pass --rollout-server URL "
                "(start them with `aha serve --weights-key KEY`, or use `aha launch`)"
            )
        if self.max_staleness and self.tis_cap <= 0:
            raise ValueError(
                f"--max-staleness {self.max_staleness} trains on samples from older weights: "
                "set --tis-cap (e.g. 2) so the loss corrects for them"
            )
        if self.seed_block < 0 or (self.seed_block and self.prompts_per_step % self.seed_block):
            raise ValueError(
                f"seed_block ({self.seed_block}) must divide prompts_per_step "
                f"({self.prompts_per_step}), or be 0"
            )
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # validates them
        for registry, name in [
            (ADVANTAGES, self.advantage),
            (POLICY_LOSSES, self.loss),
            (KL_ESTIMATORS, self.kl_estimator),
            (KL_PLACEMENTS, self.kl_placement),
            (GROUP_FILTERS, self.group_filter),
            (OVERLONG, self.overlong),
            (ENGINES, self.engine),
            (LOGGERS, self.log),
            (IMPORTANCE, self.importance),
            (WEIGHT_SYNCS, self.weight_sync),
        ]:
            registry.get(name)
        self.loss_config()
        self.overlong_config()
        self.reward_weights()
        if self.old_logp != "auto":
            OLD_LOGP.get(self.old_logp)
        kv_cache_dtype(self.kv_cache, torch.float32)
        if self.kv_cache != "model" and (
            self.rollout_server or self.engine not in ("torch", "torch-eager")
        ):
            raise ValueError(
                f"--kv-cache {self.kv_cache} needs --engine torch or torch-eager in this "
                "process (no --rollout-server)"
            )
        if self.old_logp == "sampler" and not self.sampler_is_policy():
            raise ValueError(
                "--old-logp sampler needs a sampler of the current weights in this process "
                "(--engine torch, torch-eager or hf; no --rollout-server, --tis-cap or --bf16): "
                "use --old-logp forward"
            )

    def sampler_is_policy(self) -> bool:
        """Whether the rollouts' own log-probs are the trainer's policy before its first
        step, to float rounding: sampled in this process from the current weights, in fp32 as
        the trainer computes (bf16 autocast rounds the trainer's differently). A half key/value
        cache moves them by its rounding; they are then the behaviour policy's
        own log-probs, the denominator an importance ratio asks for."""
        in_process = getattr(ENGINES.get(self.engine), "decodes_module", False)
        return in_process and not (self.rollout_server or self.tis_cap or self.bf16)

    def old_logp_source(self) -> str:
        """The ``OLD_LOGP`` entry of this run: --old-logp, with auto resolved."""
        if self.old_logp != "auto":
            return self.old_logp
        return "sampler" if self.sampler_is_policy() else "forward"

    def reward_weights(self) -> dict[str, float]:
        return parse_weights(self.reward)

    def rollout_engine(self, reference_sha: str | None = None) -> tuple[str, dict[str, Any]]:
        """The engine's name and options: the server engine when rollout servers are given
        (``reference_sha``: servers holding that reference compute the KL anchor)."""
        if not self.rollout_server:
            return self.engine, {} if self.kv_cache == "model" else {"kv_cache": self.kv_cache}
        return "server", {
            "urls": [u.strip() for u in self.rollout_server.split(",") if u.strip()],
            "weights_key": self.weights_key or os.environ.get(WEIGHTS_KEY_ENV, ""),
            "api_key": os.environ.get(API_KEY_ENV, ""),
            "weight_sync": self.weight_sync,
            "max_n": self.group_size,
            "reference_sha": reference_sha,
        }

    def loss_config(self) -> LossConfig:
        low, high = default_clip(POLICY_LOSSES.get(self.loss))
        return LossConfig(
            eps_low=low if self.eps_low is None else self.eps_low,
            eps_high=high if self.eps_high is None else self.eps_high,
            kl_coef=self.kl_coef,
            max_len=self.max_new_tokens,
        )

    def overlong_config(self) -> OverlongConfig:
        return OverlongConfig(
            max_len=self.max_new_tokens, buffer=self.overlong_buffer, penalty=self.overlong_penalty
        )

    def rollout_settings(self, tokenizer: Any) -> RolloutSettings:
        return RolloutSettings(
            prompts=self.prompts_per_step,
            group_size=self.group_size,
            params=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                stop_ids=stop_ids(tokenizer),
            ),
            weights=self.reward_weights(),
            seed_block=self.seed_block,
            group_filter=self.group_filter,
            max_rounds=self.max_sampling_rounds,
        )

    def update_settings(self, pad_id: int) -> UpdateSettings:
        return UpdateSettings(
            loss=self.loss,
            loss_config=self.loss_config(),
            kl_estimator=self.kl_estimator,
            group_size=self.group_size,
            minibatches=self.minibatches,
            epochs=self.epochs,
            micro_batch=self.micro_batch,
            skip_zero_adv=self.skip_zero_adv,
            temperature=self.temperature,
            tis_cap=self.tis_cap,
            importance=self.importance,
            max_grad_norm=self.max_grad_norm,
            pad_id=pad_id,
            old_logp=self.old_logp_source(),
            bf16=self.bf16,
        )


def lr_factor(cfg: ZeroConfig, s: int) -> float:
    """Learning-rate multiplier for step ``s`` (0-based): linear warm-up, then 1, then a linear
    decay that reaches 1/lr_decay on the last step."""
    return warmup_linear_decay(s, cfg.warmup, cfg.steps, cfg.lr_decay)


def base_figures(cfg: ZeroConfig, evals: HeldoutSet, meta: dict[str, Any]) -> dict[str, Any]:
    """Before training: the constant-template bar and the base model's own figures."""
    periodic = cfg.eval_every and cfg.eval_n < len(evals.problems)
    return {
        "template_baseline": template_baseline(evals.problems),
        "heldout": evals.run(evals.problems, 0),
        # step 0 of the periodic curve (report.dynamics compares a curve with its start)
        "periodic": evals.run(evals.problems[: cfg.eval_n], 1000) if periodic else None,
        "real": _real(cfg, evals),
        **{k: meta[k] for k in ("corpus_accuracy", "corpus_format_rate") if k in meta},
    }


def _real(cfg: ZeroConfig, evals: HeldoutSet) -> dict[str, Any] | None:
    with_real = cfg.real_eval and cfg.task.startswith("countdown")
    return evals.real(cfg.real_k, greedy=False) if with_real else None


def zero(cfg: ZeroConfig, console: Console | None = None) -> dict[str, Any]:
    t_start = time.time()
    tr = training.start(cfg, "zero", console)
    run, ranks, console, tokenizer = tr.run, tr.ranks, tr.console, tr.tokenizer
    accelerator, model = tr.accelerator, tr.model
    logger = make_logger(cfg.log, run.path, vars(cfg)) if ranks.main else NullLogger()
    meta, reverse = pretrain_meta(tr.base_path), reversed_digits(tr.base_path)
    # rollouts and evaluations: an engine that decodes a module in this process gets a plain
    # copy with the LoRA adapters merged in (one matmul per projection), others (vLLM) the
    # adapted model for its path
    ref_model = _reference(cfg, tr, accelerator.device)
    # a fixed reference can be computed by rollout servers that hold the same weights
    fixed_ref = ref_model is not None and not cfg.ref_refresh and cfg.rollout_server
    engine_name, engine_options = cfg.rollout_engine(state_sha(ref_model) if fixed_ref else None)
    rollout_model = lora.sampling_model(model)
    if lora.is_lora(model) and getattr(ENGINES.get(engine_name), "decodes_module", False):
        rollout_model = lora.merged_copy(model, tr.base_path)
    engine = make_engine(engine_name, rollout_model, tokenizer, **engine_options)
    engine.sync_weights(lora.sampling_model(model), version=0)  # servers start from ours
    evals = cfg.heldout_set(
        model, tokenizer, cfg.task, top_p=cfg.eval_top_p, engine=engine, reversed_digits=reverse
    )
    curriculum = make_curriculum(
        cfg.curriculum, cfg.task, excluded(cfg.task), target=cfg.curriculum_target
    )
    source = CurriculumSource(curriculum)
    rollouts, update = cfg.rollout_settings(tokenizer), cfg.update_settings(tokenizer.pad_token_id)
    adv_fn = ADVANTAGES.get(cfg.advantage)
    overlong_fn, overlong_cfg = OVERLONG.get(cfg.overlong), cfg.overlong_config()

    base: dict[str, Any] = {}  # rank 0 evaluates the base model once; the others wait
    if ranks.main and (run / "base_eval.json").exists():
        base = json.loads((run / "base_eval.json").read_text())
    elif ranks.main:
        console.print(f"[bold]Run:[/] {run}   [bold]model:[/] {tr.base_path} ({n_params(model):,})")
        console.print("Measuring the constant-template baseline and the base model...")
        base = base_figures(cfg, evals, meta)
        (run / "base_eval.json").write_text(json.dumps(base, indent=1))
    if ranks.main:
        tb = base["template_baseline"]
        console.print(
            f"constant-template baseline ({tb['best']}): {tb['best_acc']:.3f}   "
            f"base pass@1: {base['heldout']['pass1']:.3f}"
        )
        if update.updates > 1:  # where the ratio's denominator comes from (--old-logp)
            n, src = update.updates, update.old_logp
            console.print(f"{n} optimizer steps per batch; old-policy log-probs: {src}")

    optimizer = training.adamw(model, cfg, betas=training.RL_BETAS, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)  # the bare module: sampling and no-grad forwards
    restored = tr.restore(optimizer, scheduler)
    step = restored["step"]
    if "curriculum" in restored:
        curriculum.load_state_dict(restored["curriculum"])
    if ranks.main:
        run.cut_after("metrics.jsonl", step)
        run.cut_after("samples.jsonl", step)
    if step:  # resumed: the servers' weights carry the step's version
        engine.sync_weights(lora.sampling_model(policy), version=step)

    def sample(s: int) -> StepSample:
        """Step s's rollouts and rewards: G completions for each of P fresh prompts."""
        t0 = time.time()
        rng, gen = step_rng(cfg.seed, s)
        batch, sampled, info = sample_groups(engine, tokenizer, source, rollouts, rng, gen, ranks)
        # the curriculum sees every sampled group, those a group filter dropped included
        levels = [curriculum.level_of(p) for p in sampled.problems]
        curriculum.observe(levels, sampled.rewards.correct, cfg.group_size)
        info |= {f"curriculum/{k}": v for k, v in curriculum.mix().items()}
        return StepSample(s, batch, sampled, info | engine_stats(engine), gen, time.time() - t0)

    pipeline = RolloutPipeline(
        sample,
        start=step,
        end=cfg.steps,
        max_staleness=cfg.max_staleness,
        group_size=cfg.group_size,
    )

    def save(at: int) -> None:
        path = tr.save(at, model, optimizer, scheduler, curriculum=curriculum.state_dict())
        if ranks.main and ref_model is not None and cfg.ref_refresh:
            ref_model.save_pretrained(str(path / "reference"))

    unlogged: list[Any] = []  # the last step's row and samples until they are written

    def on_interrupt() -> None:
        pipeline.close()
        if ranks.main and unlogged and unlogged[0]["step"] == step:  # trained, not yet logged
            run.append("metrics.jsonl", unlogged[0])  # (an evaluation under way is dropped)
            run.append("samples.jsonl", *unlogged[1])
        save(step)
        logger.close()
        console.print(
            f"[yellow]Interrupted: saved step {step}. Resume: aha zero --out {run} --resume"
        )

    with progress_bar(console) as bar, interruptible(on_interrupt):
        bar_id = bar.add_task("aha zero", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            t0 = time.time()
            # 1. rollout and reward: G completions for each of P fresh prompts, every component
            # (sampled now, or ahead while the last step trained: rl/pipeline.py)
            got = pipeline.get(step)
            batch, sampled, sampling, gen = got.batch, got.sampled, got.info, got.gen
            # 2. shape the rewards: the overlong handler may penalise or mask truncations
            truncated = torch.tensor([c.finish_reason == "length" for c in batch.completions])
            lengths = torch.tensor(batch.lengths)  # (B,)
            rewards, in_loss = overlong_fn(
                torch.tensor(batch.rewards.total), lengths, truncated, overlong_cfg
            )
            # 3. reference: old-policy and reference log-probs, only where needed
            t1 = time.time()
            anchors = anchor(policy, ref_model, batch, rewards, update, cfg.kl_placement, ranks)
            # 4. advantage: group-relative; a constant group gets exactly 0
            adv = adv_fn(anchors.rewards, cfg.group_size)  # (B,)
            # 5. loss and optimizer steps, then the sampler and reference follow the policy;
            # through 6, a Ctrl-C waits for the step to be counted (the saved step is then the
            # one the weights are at)
            with interrupts_deferred():
                model.train()
                upd = policy_update(
                    model,
                    optimizer,
                    accelerator,
                    TrainBatch(batch, adv, in_loss, anchors.old_logp, anchors.ref_logp),
                    update.with_kl(anchors.loss_kl),
                    gen,
                    ranks,
                )
                scheduler.step()
                t_sync = time.time()
                # in-process: no-op
                engine.sync_weights(lora.sampling_model(policy), version=step + 1)
                pipeline.published(step + 1)
                t_sync = time.time() - t_sync
                if ref_model is not None and cfg.ref_refresh and (step + 1) % cfg.ref_refresh == 0:
                    ref_model.load_state_dict(lora.merged_state_dict(policy))
                t_train = time.time() - t1
                # 6. log (rollout figures over everything sampled this step)
                row = {"step": step + 1, **rollout_metrics(sampled, cfg.group_size, reverse)}
                row.update(sampling)
                row.update(overlong_masked=int((~in_loss).sum()), lr=scheduler.get_last_lr()[0])
                row.update({k: v for k, v in upd.items() if k != "train_tokens"})
                row.update(
                    rollout_tok_s=sum(sampled.lengths) / max(got.seconds, 1e-9),
                    rollout_wait_s=got.waited,
                    sync_s=t_sync,
                    train_tok_s=upd["train_tokens"] / max(t_train, 1e-9),
                    step_s=time.time() - t0,
                )
                unlogged[:] = [row, _samples(step + 1, batch, cfg)]  # kept if Ctrl-C comes first
                step += 1
            if ranks.main:  # rank 0 evaluates, logs and writes samples
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    ev = evals.run(evals.problems[: cfg.eval_n], 1000 + step)
                    row.update({f"eval/{k}": v for k, v in ev.items()})
                with interrupts_deferred():  # written and marked so together (on_interrupt)
                    run.append("metrics.jsonl", row)
                    logger.log(step, row)
                    run.append("samples.jsonl", *unlogged[1])
                    unlogged.clear()
            info = (
                f"reward {row['reward']:.2f}  acc {row['accuracy']:.2f}  len {row['len_mean']:.0f}"
            )
            bar.update(bar_id, advance=1, info=info)
            # 7. checkpoint
            if cfg.save_every and step % cfg.save_every == 0:
                save(step)
    pipeline.close()
    logger.close()

    final = tr.save_final(model)  # plain HF weights, LoRA merged in
    summary: dict[str, Any] = {}
    if ranks.main:  # the other ranks wait for the summary at the broadcast below
        trained = evals.run(evals.problems, 0)
        real = base.get("real") and {"base": base["real"], "trained": _real(cfg, evals)}
        summary = _summary(
            cfg,
            base=base,
            trained=trained,
            real=real,
            final=final,
            base_path=tr.base_path,
            wall_s=time.time() - t_start,
        )
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(summary, console)
    return ranks.broadcast(summary)


def _reference(cfg: ZeroConfig, tr: training.TrainingRun, device) -> torch.nn.Module | None:
    """The frozen reference of the KL term: the starting policy, or the copy last refreshed
    into the checkpoint resumed from; None when kl_coef is 0."""
    if cfg.kl_coef <= 0:
        return None
    saved = tr.resume_from / "reference" if tr.resume_from else None
    path = saved if saved is not None and saved.exists() else tr.base_path
    return load_model(path).eval().requires_grad_(False).to(device)


def _samples(step: int, batch: Rollout, cfg: ZeroConfig) -> list[dict[str, Any]]:
    """The first completion of the first ``samples_per_step`` groups, for samples.jsonl."""
    rows = []
    for i in range(min(cfg.samples_per_step, len(batch) // cfg.group_size)):
        j = i * cfg.group_size
        rows.append(
            {
                "step": step,
                "problem": batch.problems[j].question,
                "completion": batch.texts[j],
                "reward": batch.rewards.total[j],
                "correct": batch.rewards.correct[j],
            }
        )
    return rows


def _summary(
    cfg: ZeroConfig,
    *,
    base: dict[str, Any],
    trained: dict[str, Any],
    real: dict[str, Any] | None,
    final: Path,
    base_path: Path,
    wall_s: float,
) -> dict[str, Any]:
    """summary.json: the base and trained held-out figures and what they were measured on."""
    tb = base["template_baseline"]
    return {
        "base": base["heldout"],
        "trained": trained,
        "heldout_n": cfg.heldout_n,
        "template_baseline": tb["best_acc"],
        "template_baseline_name": tb["best"],
        "corpus_accuracy": base.get("corpus_accuracy"),
        "real_countdown": real or None,
        "steps": cfg.steps,
        "wall_s": round(wall_s, 1),
        "model": str(base_path),
        "final": str(final),
    }


def print_summary(summary: dict[str, Any], console: Console) -> None:
    b, t = summary["base"], summary["trained"]
    s = b["settings"]
    table = Table(
        title=f"Held-out {summary['heldout_n']} problems "
        f"(T={s['temperature']}, top-p={s['top_p']}, k={s['k']})"
    )
    for col, justify in (("metric", "left"), ("base", "right"), ("trained", "right")):
        table.add_column(col, justify=justify)
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
    for n in ("3_numbers", "4_numbers") if summary.get("real_countdown") else ():
        real = summary["real_countdown"]
        table.add_row(
            f"real Countdown {n.replace('_', ' ')} pass@1",
            f"{real['base'][n]['pass1']:.3f}",
            f"{real['trained'][n]['pass1']:.3f}",
        )
    console.print(table)
    console.print(f"wall time {summary['wall_s']:.0f} s   final model: {summary['final']}")


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("zero", argv)


if __name__ == "__main__":
    raise SystemExit(main())
