"""GRPO step speed: our `aha zero` step against TRL's GRPOTrainer, end to end, on the same task.

Both sides run the same algorithm on the same weights, prompts and reward, one step after another:

- 16 countdown prompts x 8 completions per step, rendered with the R1-Zero template; step s uses
  the same 16 problems on both sides;
- at most 128 new tokens, T=1, no top-p or top-k; both sides stop on the same ids (EOS and
  ``</answer>``, as `aha zero` does), so the lengths follow the same distribution and the
  comparison is in completion tokens per second (the stop token counts, on both sides);
- reward: ``ahamoment.rewards.score`` with accuracy=1.0, format=0.1, on the completion decoded
  the same way (TRL's own decode drops the think tags, so its reward function decodes the ids);
- GRPO advantages (r - mean) / (std + 1e-4) per group, the ``grpo`` loss (sequence mean, clip
  0.2), beta 0 (no reference model), one optimizer step per rollout, AdamW lr 5e-4 with betas
  (0.9, 0.99), no weight decay, gradient clipping at 1.0, fp32, no vLLM.

Our step is built from the components `aha zero` runs: ``rl.rollouts.sample_groups`` (rollout
and reward), the ``grpo`` advantage, then ``rl.update.policy_update`` (loss, backward, AdamW step), with
the zero recipe's micro-batch of 64 sequences (8 groups) per packed forward/backward. TRL runs
``GRPOTrainer.train`` with every setting pinned and printed (loss_type, micro-batch size,
steps_per_generation, gradient checkpointing off, fp32); its completion tokens are counted from
the ids its reward function receives. TRL gets the settings that ran fastest for it here with one
thread (docs/results/performance.md): micro-batch 16 with steps_per_generation =
gradient_accumulation_steps = 8 (one optimizer step per generation, no old-policy forward);
plain ``generate`` rather than continuous batching; no gradient checkpointing (TRL defaults it
on); fp32 rather than bf16 autocast.

Each repeat loads fresh weights for each side, makes one warm-up step, then times ``--steps``
steps end to end (wall clock from the end of one step to the end of the next). Every run pins one
torch thread (two threads on a loaded 2-core box stall; FINDINGS.md), and the sides alternate
TRL/ours/TRL/ours. The speedup is the median over repeats of (ours tok/s / TRL tok/s), each pair
measured back to back. Models: ``llama3m`` (about 3.2M parameters, random weights, built from a
config with the embedded tokenizer) and ``default`` (the embedded default: the shipped base).

    pip install -e '.[bench]'                        # TRL is a bench-only extra
    python bench/grpo_vs_trl.py                      # both models, 3 repeats x 3 timed steps
    python bench/grpo_vs_trl.py --quick              # smoke: 4 prompts x 2, 16 tokens, 1 step
    python bench/grpo_vs_trl.py --models default --repeats 5 --trl-micro-batch 32

Our side runs twice per repeat. As `aha zero` runs by default, it skips the forward and backward
of rows whose advantage is exactly 0 (a group with all-equal rewards): with beta 0 they add exactly
0 to the gradient, so the update is the same (tests/test_policy_update.py checks it), and the
table gives the share of rows trained. Then with ``skip_zero_adv=False``, training every row as
TRL does. On ``llama3m`` (random weights) every reward is 0, so the first arm trains nothing and
measures the rollout alone; the "all rows" ratio is the compute-bound comparison there.

The last lines are ``grpo_speedup_llama3m_all_rows=X``, ``grpo_speedup_all_rows=X``,
``grpo_speedup_llama3m=X`` and ``grpo_speedup=X`` (the embedded default, as `aha zero` runs).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from ahamoment import training
from ahamoment.data import sample_excluding
from ahamoment.models import load_model, load_tokenizer, n_params
from ahamoment.prompts import r1_zero_prompt, stop_ids
from ahamoment.rewards import parse_weights, score
from ahamoment.rl import ADVANTAGES
from ahamoment.rl.rollouts import PromptSource, sample_groups
from ahamoment.rl.update import TrainBatch, policy_update
from ahamoment.rollout import make_engine
from ahamoment.splits import excluded
from ahamoment.stages.zero import ZeroConfig
from ahamoment.tasks import get_task

MODELS = ("llama3m", "default")  # the embedded default goes last: its ratio is the headline
TASK = "countdown"
REWARD = "accuracy=1.0,format=0.1"
LR = 5e-4


@dataclass
class Sizes:
    prompts: int = 16
    group: int = 8
    max_new_tokens: int = 128
    steps: int = 3  # timed steps per repeat, after one warm-up step
    repeats: int = 3
    trl_micro_batch: int = 16  # TRL per_device_train_batch_size (completions per forward)
    our_micro_batch: int = 64  # ours, as recipes/zero-countdown.yaml: 8 groups per forward/backward

    @property
    def batch(self) -> int:
        return self.prompts * self.group


def step_problems(sz: Sizes, n_steps: int):
    """The problems of each step, drawn exactly as ``sample_groups`` draws them from rng(s)."""
    task, exclude = get_task(TASK), excluded(TASK)
    out = []
    for s in range(n_steps):
        rng = random.Random(s)
        out.append([sample_excluding(task, rng, exclude) for _ in range(sz.prompts)])
    return out


def decode(tokenizer, ids: list[int]) -> str:
    """As ``ahamoment.evaluation.generate`` decodes a completion (EOS dropped, tags kept)."""
    body = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(body, skip_special_tokens=False)


# --- TRL ----------------------------------------------------------------------------------
def trl_config(sz: Sizes, out_dir: str, n_steps: int):
    from trl import GRPOConfig

    steps_per_gen = sz.batch // sz.trl_micro_batch  # one optimizer step per generation
    return GRPOConfig(
        output_dir=out_dir,
        max_steps=n_steps,
        per_device_train_batch_size=sz.trl_micro_batch,
        gradient_accumulation_steps=steps_per_gen,
        steps_per_generation=steps_per_gen,
        num_iterations=1,
        num_generations=sz.group,
        max_completion_length=sz.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        mask_truncated_completions=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        activation_checkpointing=False,  # GRPOConfig defaults it to True
        use_vllm=False,
        use_transformers_continuous_batching=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        shuffle_dataset=False,
        seed=0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


TRL_PINNED = (
    "loss_type",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "generation_batch_size",
    "num_iterations",
    "num_generations",
    "max_completion_length",
    "beta",
    "scale_rewards",
    "epsilon",
    "temperature",
    "top_p",
    "top_k",
    "activation_checkpointing",
    "gradient_checkpointing",
    "use_vllm",
    "use_transformers_continuous_batching",
    "bf16",
    "fp16",
    "use_cpu",
    "optim",
    "learning_rate",
    "lr_scheduler_type",
    "adam_beta1",
    "adam_beta2",
    "weight_decay",
    "max_grad_norm",
    "torch_compile",
)


class _StepClock(TrainerCallback):
    """Wall-clock time at the end of each optimizer step (and at the start of training)."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.threads: set[int] = set()

    def on_train_begin(self, args, state, control, **kw):
        self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.marks.append(time.perf_counter())
        self.threads.add(torch.get_num_threads())


def run_trl(model_dir: Path, problems, sz: Sizes, tmp: str) -> tuple[list[float], list[int], dict]:
    """Seconds and completion tokens of each TRL step (the first is the warm-up)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    model.generation_config.eos_token_id = list(stop_ids(tokenizer))  # same stops as ours
    flat = [p for step in problems for p in step]
    data = Dataset.from_dict(
        {"prompt": [r1_zero_prompt(p.question) for p in flat], "pid": list(range(len(flat)))}
    )
    weights = parse_weights(REWARD)
    tokens: list[int] = []

    def reward(prompts, completions, completion_ids, pid, **kw) -> list[float]:
        tokens.append(sum(len(c) for c in completion_ids))
        texts = [decode(tokenizer, c) for c in completion_ids]
        return score([flat[i] for i in pid], texts, weights).total

    args = trl_config(sz, tmp, len(problems))
    clock = _StepClock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        trainer.train()
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    settings = {k: getattr(args, k) for k in TRL_PINNED}
    for k in ("optim", "lr_scheduler_type"):
        settings[k] = getattr(settings[k], "value", settings[k])
    settings["eos_token_id (stops)"] = model.generation_config.eos_token_id
    settings["attn_implementation"] = model.config._attn_implementation
    settings["torch threads during steps"] = sorted(clock.threads)
    return seconds, tokens, settings


# --- ours ---------------------------------------------------------------------------------
def our_config(model_dir: Path, sz: Sizes, skip_zero_adv: bool = True) -> ZeroConfig:
    return ZeroConfig(
        model=str(model_dir),
        task=TASK,
        prompts_per_step=sz.prompts,
        group_size=sz.group,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=sz.max_new_tokens,
        reward=REWARD,
        advantage="grpo",
        loss="grpo",
        lora_rank=0,  # every weight trains, as TRL's
        lr=LR,
        warmup=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        minibatches=1,
        epochs=1,
        micro_batch=sz.our_micro_batch,
        kl_coef=0.0,
        group_filter="all",
        overlong="none",
        engine="torch",
        threads=1,
        skip_zero_adv=skip_zero_adv,
    )


def run_ours(
    model_dir: Path, n_steps: int, sz: Sizes, skip_zero_adv: bool = True
) -> tuple[list[float], list[int], dict]:
    """Seconds and completion tokens of each of our steps (the first is the warm-up), plus
    the time split of the timed steps: rollout+reward, reward alone (re-scored), train, and
    the rows trained (summed fraction; ``skip_zero_adv`` skips rows of advantage 0)."""
    cfg = our_config(model_dir, sz, skip_zero_adv)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    source = PromptSource(get_task(TASK), excluded(TASK))
    rollouts, update = cfg.rollout_settings(tokenizer), cfg.update_settings(tokenizer.pad_token_id)
    adv_fn = ADVANTAGES.get(cfg.advantage)
    accelerator = Accelerator(cpu=True)
    optimizer = training.adamw(model, cfg, betas=training.RL_BETAS, fused=True)  # as `aha zero`
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = make_engine(cfg.engine, accelerator.unwrap_model(model), tokenizer)  # in-process
    seconds, tokens = [], []
    split = {"rollout+reward": 0.0, "reward": 0.0, "train": 0.0, "rows": 0.0}
    t_prev = time.perf_counter()
    for s in range(n_steps):
        rng, gen = random.Random(s), torch.Generator().manual_seed(s)
        batch, _, _ = sample_groups(engine, tokenizer, source, rollouts, rng, gen)
        t_roll = time.perf_counter()
        adv = adv_fn(torch.tensor(batch.rewards.total), cfg.group_size)  # (B,)
        in_loss = torch.ones(len(batch), dtype=torch.bool)  # (B,) no overlong masking
        model.train()
        # one optimizer step per rollout: old log-probs are the current ones, detached; beta 0:
        # no reference model
        stats = policy_update(
            model, optimizer, accelerator, TrainBatch(batch, adv, in_loss), update, gen
        )
        t_end = time.perf_counter()
        seconds.append(t_end - t_prev)
        tokens.append(sum(batch.lengths))
        if s > 0:  # outside the clock: how much of the rollout+reward time is the reward
            split["rollout+reward"] += t_roll - t_prev
            split["train"] += t_end - t_roll
            split["rows"] += stats["train_rows_frac"]
            t0 = time.perf_counter()
            score(batch.problems, batch.texts, rollouts.weights)
            split["reward"] += time.perf_counter() - t0
        t_prev = time.perf_counter()
    return seconds, tokens, split


# --- the comparison -----------------------------------------------------------------------
def compare(name: str, model_dir: Path, sz: Sizes, console: Console) -> dict:
    """Per repeat: TRL, then ours, then ours training every row (``skip_zero_adv`` off), each
    of our two runs paired with that repeat's TRL run."""
    n_steps = 1 + sz.steps
    problems = step_problems(sz, n_steps)
    rows: dict[str, list[tuple[float, int]]] = {"trl": [], "ours": [], "all": []}
    split_total = {"rollout+reward": 0.0, "reward": 0.0, "train": 0.0, "rows": 0.0}
    ratios: dict[str, list[float]] = {"ours": [], "all": []}
    settings: dict = {}
    for r in range(sz.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            sec, tok, settings = run_trl(model_dir, problems, sz, tmp)
        trl_s, trl_t = sum(sec[1:]), sum(tok[1:])
        rows["trl"].append((trl_s, trl_t))
        line = (
            f"  {name} repeat {r + 1}/{sz.repeats}: TRL {trl_s / sz.steps:.2f} s/step, "
            f"{trl_t / sz.steps:.0f} tok/step, {trl_t / trl_s:,.0f} tok/s"
        )
        for arm, skip in (("ours", True), ("all", False)):
            sec, tok, split = run_ours(model_dir, n_steps, sz, skip_zero_adv=skip)
            our_s, our_t = sum(sec[1:]), sum(tok[1:])
            if arm == "ours":
                for k in split_total:
                    split_total[k] += split[k]
            rows[arm].append((our_s, our_t))
            ratios[arm].append((our_t / our_s) / (trl_t / trl_s))
            line += (
                f" | {arm} {our_s / sz.steps:.2f} s/step, {our_t / sz.steps:.0f} tok/step, "
                f"{our_t / our_s:,.0f} tok/s, ratio {ratios[arm][-1]:.2f}"
            )
        console.print(line)
    n_params_ = n_params(load_model(model_dir))

    def med(side: str, f) -> float:
        return statistics.median(f(s, t) for s, t in rows[side])

    timed = sz.steps * sz.repeats
    return {
        "name": name,
        "params": n_params_,
        "trl_step_s": med("trl", lambda s, t: s / sz.steps),
        "trl_len": med("trl", lambda s, t: t / sz.steps / sz.batch),
        "trl_tok_s": med("trl", lambda s, t: t / s),
        "our_step_s": med("ours", lambda s, t: s / sz.steps),
        "our_len": med("ours", lambda s, t: t / sz.steps / sz.batch),
        "our_tok_s": med("ours", lambda s, t: t / s),
        "all_step_s": med("all", lambda s, t: s / sz.steps),
        "all_tok_s": med("all", lambda s, t: t / s),
        "speedup": statistics.median(ratios["ours"]),
        "speedup_all": statistics.median(ratios["all"]),
        "split": {k: v / timed for k, v in split_total.items()},
        "trl_settings": settings,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of llama3m, default")
    ap.add_argument("--repeats", type=int, default=3, help="TRL/ours pairs per model")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after 1 warm-up)")
    ap.add_argument(
        "--trl-micro-batch",
        type=int,
        default=16,
        help="TRL per_device_train_batch_size; steps_per_generation = 128 / this",
    )
    ap.add_argument(
        "--our-micro-batch",
        type=int,
        default=Sizes.our_micro_batch,
        help="our micro_batch, as the zero recipe's (0: one group of G rows per forward)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    args = ap.parse_args(argv)
    sz = Sizes(
        steps=args.steps,
        repeats=args.repeats,
        trl_micro_batch=args.trl_micro_batch,
        our_micro_batch=args.our_micro_batch,
    )
    if args.quick:
        sz = Sizes(prompts=4, group=2, max_new_tokens=16, steps=1, repeats=1, trl_micro_batch=8)
    if sz.batch % sz.trl_micro_batch:
        ap.error(f"--trl-micro-batch must divide {sz.batch}")
    names = [m for m in MODELS if m in args.models.split(",")]  # default always last
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    console = Console(width=160)

    import transformers
    import trl

    from rollout import model_dirs  # bench/rollout.py: the same two models

    console.print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, threads {torch.get_num_threads()}; {sz.prompts} prompts x "
        f"{sz.group} completions, <= {sz.max_new_tokens} tokens, stop on EOS and </answer>, "
        f"1 warm-up + {sz.steps} timed steps, {sz.repeats} repeats"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_dirs(names, Path(tmp), console).items():
            results.append(compare(name, path, sz, console))

    console.print("TRL GRPOConfig (pinned):")
    for k, v in results[-1]["trl_settings"].items():
        console.print(f"  {k} = {v}")
    console.print(
        f"ours: ZeroConfig advantage=grpo loss=grpo kl_coef=0 minibatches=1 epochs=1 "
        f"micro_batch={sz.our_micro_batch} optimizer=adamw lr={LR} warmup=0, fp32"
    )
    table = Table(title=f"GRPO step, end to end (median of {sz.repeats} x {sz.steps} steps)")
    cols = ("model", "params", "TRL s/step", "TRL len", "TRL tok/s", "ours s/step", "ours len")
    cols += ("ours tok/s", "rows trained", "speedup", "all rows s/step", "speedup, all rows")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        table.add_row(
            r["name"],
            f"{r['params'] / 1e6:.2f}M",
            f"{r['trl_step_s']:.2f}",
            f"{r['trl_len']:.1f}",
            f"{r['trl_tok_s']:,.0f}",
            f"{r['our_step_s']:.2f}",
            f"{r['our_len']:.1f}",
            f"{r['our_tok_s']:,.0f}",
            f"{r['split']['rows']:.0%}",
            f"{r['speedup']:.2f}x",
            f"{r['all_step_s']:.2f}",
            f"{r['speedup_all']:.2f}x",
        )
    console.print(table)
    console.print(
        "rows trained: ours skips the forward and backward of rows whose advantage is exactly 0 "
        "(all-equal groups; with beta 0 they add exactly 0 to the gradient, and TRL computes "
        "them anyway). 'all rows' turns that off (skip_zero_adv=False)."
    )
    for r in results:
        sp = r["split"]
        console.print(
            f"ours, {r['name']}, mean s/step: rollout {sp['rollout+reward'] - sp['reward']:.3f}, "
            f"reward {sp['reward']:.3f}, train {sp['train']:.3f}"
        )
    for r in results:
        key = "grpo_speedup" if r["name"] == "default" else f"grpo_speedup_{r['name']}"
        print(f"{key}_all_rows={r['speedup_all']:.2f}")
    for r in results:
        key = "grpo_speedup" if r["name"] == "default" else f"grpo_speedup_{r['name']}"
        print(f"{key}={r['speedup']:.2f}")


if __name__ == "__main__":
    main()
