"""`aha r1`: the four-stage DeepSeek-R1 pipeline, compared against R1-Zero on the same base.

The base model mixes two "languages" in its reasoning (language.py; `aha pretrain
--p-foreign 0.3`), so R1-Zero, trained from it on correctness and format only, mixes them too.
The stages, each in its own subfolder of ``--out``:

- ``zero/``: the reference, R1-Zero (`aha zero`) on the base model.
- ``1-cold-start/``: SFT of the base on a few readable, verified, single-language chains of
  thought written by the task's trace template with little noise (searches longer, checks
  every hit, never slips, no second language).
- ``2-reasoning-rl/``: GRPO from stage 1 with correctness + format + language consistency.
- ``3-rejection-sft/``: `aha distill generate` with the stage-2 model as teacher keeps correct
  single-language traces; SFT of the *base* model on them plus the cold-start set. (The paper
  adds 200k non-reasoning samples; the embedded world has no non-reasoning domain.)
- ``4-final-rl/``: a final GRPO round from stage 3 with the same rewards.

Each finished stage writes ``done.json``; a rerun skips finished stages and resumes the
unfinished one from its own checkpoints. At the end both final models are evaluated alike on
held-out problems and ``summary.json`` holds them under ``zero`` and ``r1``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ahamoment import atomic
from ahamoment import config as cfglib
from ahamoment.base_models import embedded_base
from ahamoment.data import sample_excluding
from ahamoment.evaluation import heldout_figures
from ahamoment.models import load_model, load_tokenizer, set_threads
from ahamoment.prompts import r1_zero_prompt
from ahamoment.rewards import judge
from ahamoment.splits import excluded
from ahamoment.stages.pretrain import PretrainConfig
from ahamoment.tasks import TASKS, get_task
from ahamoment.tasks.base import TraceNoise

STAGES = ("zero", "1-cold-start", "2-reasoning-rl", "3-rejection-sft", "4-final-rl")


@dataclass
class R1Config:
    model: str = ""
    """Base model directory. Empty: the embedded default built with --p-foreign (two languages)."""
    p_foreign: float = 0.3
    """With no --model: the base corpus writes each reasoning line in the second language with this probability."""
    task: str = "countdown"
    """Task for prompts, traces and held-out evaluation."""
    zero_steps: int = 200
    """R1-Zero reference: GRPO steps on the base (correctness + format only)."""
    cold_start_n: int = 1000
    """Stage 1: readable verified chains of thought for the cold-start SFT."""
    cold_start_max_frac: float = 0.5
    """Stage 1: keep only cold-start traces at most this share of --max-new-tokens long; the
    cold-started model searches longer than its examples, and a search cut off has no answer."""
    cold_start_epochs: float = 3.0
    """Stage 1 (and the cold-start share of stage 3): SFT epochs."""
    sft_lr: float = 1e-3
    """Stages 1 and 3: SFT peak learning rate."""
    format_weight: float = 1.0
    """Every RL stage, R1-Zero's too: weight of the format reward (accuracy weighs 1)."""
    language_weight: float = 0.2
    """Stages 2 and 4: weight of the language-consistency reward."""
    kl_coef: float = 0.05
    """Every RL stage: β of the KL penalty to the stage's starting model."""
    overlong_buffer: int = 64
    """Every RL stage: the soft overlong penalty ramps over the last N tokens of
    --max-new-tokens (a search cut off scores less than one that answers)."""
    lora_rank: int = 4
    """Every RL stage: rank of the LoRA adapters trained (0: every weight)."""
    minibatches: int = 1
    """Every RL stage: optimizer steps per rollout batch."""
    rl_steps: int = 100
    """Stage 2: reasoning-RL GRPO steps."""
    rs_prompts: int = 1500
    """Stage 3: prompts sent to the stage-2 model for rejection sampling."""
    rs_samples: int = 4
    """Stage 3: samples per prompt; the correct, single-language, distinct ones are kept."""
    rs_epochs: float = 2.0
    """Stage 3: SFT epochs over the rejection-sampled traces plus the cold-start set."""
    final_rl_steps: int = 100
    """Stage 4: final GRPO steps."""
    rl_recipe: str = ""
    """`aha zero` recipe YAML for every RL stage, R1-Zero's too (group size, lr, ...); model,
    steps, reward, KL β, overlong ramp, LoRA rank, minibatches, seed and out are set here.
    Empty: `aha zero`'s defaults."""
    rl_check_n: int = 100
    """Held-out problems in each RL stage's own before/after check (the comparison uses heldout_n)."""
    sft_batch_size: int = 32
    """Stages 1 and 3: sequences per SFT step."""
    heldout_n: int = 1000
    """Held-out problems in the final comparison."""
    eval_k: int = 4
    """Samples per held-out problem (pass@1 is their mean; temperature 1)."""
    max_new_tokens: int = 128
    """Longest completion in rollouts, teacher sampling and evaluation."""
    out: str = "runs/r1"
    """Run directory: one subfolder per stage; rerun with the same --out to resume."""
    seed: int = 0
    """Seed of every stage."""
    threads: int = 0
    """torch CPU threads; 0 uses every core this process may run on."""

    def __post_init__(self) -> None:
        TASKS.get(self.task)
        if not 0.0 <= self.p_foreign <= 1.0:
            raise ValueError("p_foreign must lie in [0, 1]")
        for name in ("zero_steps", "rl_steps", "final_rl_steps", "cold_start_n", "rs_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if min(self.heldout_n, self.eval_k, self.rs_samples, self.rl_check_n) < 1:
            raise ValueError("heldout_n, eval_k, rs_samples and rl_check_n must be positive")
        if self.kl_coef < 0 or self.overlong_buffer < 1 or self.lora_rank < 0:
            raise ValueError("kl_coef and lora_rank must be >= 0, overlong_buffer at least 1")
        if self.minibatches < 1:
            raise ValueError(f"minibatches must be at least 1, got {self.minibatches}")
        if not 0.0 < self.cold_start_max_frac <= 1.0:
            raise ValueError("cold_start_max_frac must lie in (0, 1]")
        if self.rl_recipe and not Path(self.rl_recipe).exists():
            raise FileNotFoundError(f"--rl-recipe: {self.rl_recipe} does not exist")

    def zero_reward(self) -> str:
        """R1-Zero's rewards: correctness and format only."""
        return f"accuracy=1.0,format={self.format_weight}"

    def rl_reward(self) -> str:
        """Stages 2 and 4: R1-Zero's rewards plus language consistency."""
        return f"{self.zero_reward()},language={self.language_weight}"


# Stage 1's template: the task's own trace generator, with little noise and one language.
READABLE = TraceNoise(
    p_give_up=0.35, p_false_hit=0.0, p_check=1.0, p_drop_tags=0.0, p_guess=0.0, p_foreign=0.0
)


def cold_start_data(cfg: R1Config, tokenizer: Any, path: Path) -> dict[str, Any]:
    """Write ``cold_start_n`` readable traces (verified correct, at most ``cold_start_max_frac`` of max_new_tokens long) as
    prompt/completion JSONL; atomic, so a kill never leaves half a file."""
    task = get_task(cfg.task)
    rng = random.Random(cfg.seed + 101)
    exclude = excluded(cfg.task)
    rows, drawn = [], 0
    while len(rows) < cfg.cold_start_n:
        drawn += 1
        if drawn > 50 * cfg.cold_start_n:
            limit = int(cfg.cold_start_max_frac * cfg.max_new_tokens)
            raise RuntimeError(
                f"cold start: under 1 in 50 template traces is correct and at most {limit} "
                "tokens long; raise --max-new-tokens or --cold-start-max-frac"
            )
        problem = sample_excluding(task, rng, exclude)
        completion = task.trace(problem, rng, READABLE)
        # room in the budget: the cold-started model searches longer than its examples, RL
        # lengthens the searches again, and a truncated completion has no answer
        too_long = len(tokenizer(completion, add_special_tokens=False)["input_ids"]) > (
            cfg.cold_start_max_frac * cfg.max_new_tokens
        )
        if too_long or not judge(problem, completion)[1].correct:
            continue
        rows.append({"prompt": r1_zero_prompt(problem.question), "completion": completion})
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return {"traces": len(rows), "drawn": drawn}


def run_stage(run: Path, name: str, fn: Callable[[Path], dict[str, Any]], console: Console):
    """Run ``fn(stage_dir)`` unless the stage has its ``done.json``; returns its record."""
    d = run / name
    done = d / "done.json"
    if done.exists():
        console.print(f"[dim]{name}: done, skipped ({done})")
        return json.loads(done.read_text())
    console.rule(f"[bold]{name}")
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    record = fn(d)
    record["stage_s"] = round(time.time() - t0, 1)
    atomic.write_json(done, record)
    return record


def rl_config(cfg: R1Config, zero_config: type, model: Path, steps: int, reward: str, d: Path):
    """The `aha zero` config of an RL stage in ``d``: ``--rl-recipe`` with what the stage sets."""
    return cfglib.build(
        zero_config,
        cfg.rl_recipe or None,
        model=str(model),
        task=cfg.task,
        steps=steps,
        reward=reward,
        max_new_tokens=cfg.max_new_tokens,
        kl_coef=cfg.kl_coef,
        overlong_buffer=cfg.overlong_buffer,
        lora_rank=cfg.lora_rank,
        minibatches=cfg.minibatches,
        eval_every=0,
        eval_n=min(50, cfg.rl_check_n),
        heldout_n=cfg.rl_check_n,
        eval_k=2,
        real_eval=False,
        out=str(d / "train"),
        resume=(d / "train").exists(),
        seed=cfg.seed,
        threads=cfg.threads,
    )


def compare(model_dir: Path, cfg: R1Config) -> dict[str, Any]:
    """Held-out figures of one final model; R1-Zero and R1 get the same problems and seed."""
    return heldout_figures(
        load_model(model_dir).eval(),
        load_tokenizer(model_dir),
        cfg.task,
        cfg.heldout_n,
        k=cfg.eval_k,
        temperature=1.0,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed + 20_000,
    )["heldout"]


def r1(cfg: R1Config, console: Console | None = None) -> dict[str, Any]:
    from ahamoment.stages.distill import DistillGenerateConfig, distill_generate
    from ahamoment.stages.sft import SFTConfig, sft
    from ahamoment.stages.zero import ZeroConfig, zero

    console = console or Console()
    set_threads(cfg.threads)
    t_start = time.time()
    # a bad RL recipe stops the run before anything is written
    run = Path(cfg.out)
    rl_config(cfg, ZeroConfig, Path(cfg.model), cfg.zero_steps, cfg.rl_reward(), run / "zero")
    run.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, run / "config.yaml")
    base = Path(cfg.model) if cfg.model else None
    if base is None:  # the two-language base: shipped, cached, or built now
        pcfg = PretrainConfig(task=cfg.task, p_foreign=cfg.p_foreign, threads=cfg.threads)
        base = embedded_base(pcfg, console)
    console.print(f"[bold]Base model:[/] {base}")

    def rl(d: Path, model: Path, steps: int, reward: str) -> dict[str, Any]:
        s = zero(rl_config(cfg, ZeroConfig, model, steps, reward, d), console)
        return {"model": str(d / "train" / "final"), "steps": steps, "check": s["trained"]}

    def sft_on(d: Path, data: str, model: Path, epochs: float) -> dict[str, Any]:
        s = sft(
            SFTConfig(
                data=data,
                model=str(model),
                task=cfg.task,
                epochs=epochs,
                lr=cfg.sft_lr,
                batch_size=cfg.sft_batch_size,
                max_new_tokens=cfg.max_new_tokens,
                heldout_n=0,
                out=str(d / "train"),
                resume=(d / "train").exists(),
                seed=cfg.seed,
                threads=cfg.threads,
            ),
            console,
        )
        return {"model": str(d / "train" / "final"), "train_s": s.get("train_s")}

    # R1-Zero, the reference: correctness + format only, straight from the base.
    zero_rec = run_stage(
        run, "zero", lambda d: rl(d, base, cfg.zero_steps, cfg.zero_reward()), console
    )

    # 1. cold start: SFT on readable chains of thought
    def stage1(d: Path) -> dict[str, Any]:
        data = d / "cold_start.jsonl"
        facts = cold_start_data(cfg, load_tokenizer(base), data)
        return {**facts, **sft_on(d, str(data), base, cfg.cold_start_epochs)}

    s1 = run_stage(run, "1-cold-start", stage1, console)

    # 2. reasoning RL with the language-consistency reward
    s2 = run_stage(
        run,
        "2-reasoning-rl",
        lambda d: rl(d, Path(s1["model"]), cfg.rl_steps, cfg.rl_reward()),
        console,
    )

    # 3. rejection sampling from the stage-2 model, then SFT of the base model
    def stage3(d: Path) -> dict[str, Any]:
        g = distill_generate(
            DistillGenerateConfig(
                teacher=s2["model"],
                task=cfg.task,
                n_prompts=cfg.rs_prompts,
                samples=cfg.rs_samples,
                max_new_tokens=cfg.max_new_tokens,
                min_script_share=1.0,  # readable: not one foreign character
                out=str(d / "traces"),
                seed=cfg.seed + 1,
                threads=cfg.threads,
            ),
            console,
        )
        data = str(run / "1-cold-start" / "cold_start.jsonl")
        if g["accepted"]:
            data = f"{d / 'traces'},{data}"
        else:
            console.print(
                "[yellow]No trace passed the filters: stage 3 trains on the cold start alone."
            )
        rec = sft_on(d, data, base, cfg.rs_epochs)
        return {"accepted": g["accepted"], "rejected_by": g["rejected_by"], **rec}

    s3 = run_stage(run, "3-rejection-sft", stage3, console)

    # 4. final RL
    s4 = run_stage(
        run,
        "4-final-rl",
        lambda d: rl(d, Path(s3["model"]), cfg.final_rl_steps, cfg.rl_reward()),
        console,
    )

    console.rule("[bold]R1-Zero vs R1 on held-out problems")
    summary = {
        "zero": compare(Path(zero_rec["model"]), cfg),
        "r1": compare(Path(s4["model"]), cfg),
        "heldout_n": cfg.heldout_n,
        "stages": {
            name: rec.get("stage_s") for name, rec in zip(STAGES, (zero_rec, s1, s2, s3, s4))
        },
        "base_model": str(base),
        "wall_s": round(time.time() - t_start, 1),
    }
    atomic.write_json(run / "summary.json", summary)
    print_comparison(summary, console)
    return summary


def print_comparison(summary: dict[str, Any], console: Console) -> None:
    z, r = summary["zero"], summary["r1"]
    s = z["settings"]
    table = Table(
        title=f"R1-Zero vs R1, {summary['heldout_n']} held-out problems "
        f"(T={s['temperature']}, k={s['k']})"
    )
    for col in ("metric", "R1-Zero", "R1", "R1 - R1-Zero"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label, d in [
        ("pass1", "sampled pass@1", 3),
        ("mixing_rate", "language-mixing rate", 3),
        ("format_rate", "format rate", 3),
        ("mean_len", "mean length (tokens)", 1),
        ("greedy_acc", "greedy accuracy", 3),
        ("reflection_rate", "reflection rate", 3),
    ]:
        table.add_row(label, f"{z[key]:.{d}f}", f"{r[key]:.{d}f}", f"{r[key] - z[key]:+.{d}f}")
    console.print(table)
    console.print(f"wall time {summary['wall_s'] / 60:.1f} min; stages (s): {summary['stages']}")


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage as run_cli_stage

    return run_cli_stage("r1", argv)


if __name__ == "__main__":
    raise SystemExit(main())
