"""`aha distill-generate` and `aha distill`: verified reasoning traces from a teacher, and the
DeepSeek-R1 paper's distillation-versus-RL comparison in miniature.

`distill-generate` loop: take the prompts not yet done (from the task's generator, never a
held-out problem, or from a JSONL file); send them in chunks to the teacher (a local model
directory or an OpenAI-compatible chat endpoint, see `teachers.py`) for n samples each; keep
the samples that pass every filter in `traces.py` (rejection sampling on the task's verifier);
write each prompt's rows, then its done-marker; update the bar (accepted / rejected / failed)
and `stats.json`. A rerun resumes: done prompts are skipped, torn writes repaired. Chunks are
fixed slices of the prompt list, each seeded by its start, and a local teacher samples a chunk
that a kill cut short whole again (keeping only the prompts not done), so a resumed run writes
what an uninterrupted one does; a remote teacher is asked only for the prompts not done.

`distill` runs the comparison on the embedded default: a student base model (a smaller
`aha pretrain`, its build not timed) is trained (A) by `aha sft` on the teacher's verified
traces (timed: teacher sampling + SFT) and (B) by `aha zero` GRPO (timed: its training steps),
for each seed and, for B, each learning rate (the best by held-out pass@1 is reported). Every
model is evaluated the same way: held-out problems of the task and the real Countdown sample.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ahamoment import atomic
from ahamoment import config as cfglib
from ahamoment.base_models import ensure_base_model
from ahamoment.data import DataError, sample_excluding
from ahamoment.evaluation import heldout_figures
from ahamoment.models import load_model, load_tokenizer, set_threads
from ahamoment.progress import progress_bar
from ahamoment.prompts import r1_zero_prompt
from ahamoment.rollout.base import SamplingParams
from ahamoment.runs import RunDir, interruptible
from ahamoment.splits import excluded
from ahamoment.tasks import TASKS, get_task
from ahamoment.tasks.base import Problem
from ahamoment.teachers import ChatTeacher, LocalTeacher
from ahamoment.traces import REJECT_REASONS, TraceFilters, TraceStore, filter_samples


@dataclass
class DistillGenerateConfig:
    teacher: str = ""
    """Local HF model directory of the teacher (ignored with --base-url)."""
    base_url: str = ""
    """OpenAI-compatible endpoint (e.g. https://api.deepseek.com/v1, a vLLM or `aha serve` URL)."""
    api_model: str = ""
    """Model name at --base-url (e.g. deepseek-reasoner)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (never written to disk)."""
    task: str = "countdown"
    """Task that supplies prompts (when --prompts is empty) and verifies answers."""
    prompts: str = ""
    """JSONL file of problems in the task's format; empty: draw from the task's generator."""
    n_prompts: int = 2000
    """Prompts drawn from the task's generator (distinct, none held out)."""
    samples: int = 4
    """Samples per prompt (rejection sampling keeps only verified ones)."""
    temperature: float = 1.0
    """Teacher sampling temperature."""
    top_p: float = 1.0
    """Teacher nucleus sampling."""
    max_new_tokens: int = 128
    """Longest teacher completion (tokens)."""
    max_chars: int = 4000
    """Filter: longest kept completion in characters (0: no limit)."""
    min_script_share: float = 0.95
    """Filter: least share of reasoning characters in the expected (ASCII) script (0: off)."""
    near_dup: float = 0.9
    """Filter: similarity ratio (difflib) to a kept sample of the same prompt that rejects it (1: off)."""
    chunk: int = 256
    """Prompts per teacher call (and per progress update)."""
    concurrency: int = 8
    """Remote teacher: concurrent requests."""
    timeout: float = 120.0
    """Remote teacher: seconds before a request counts as hung and is retried."""
    max_retries: int = 5
    """Remote teacher: retries per prompt on 429, 5xx, timeouts and malformed responses."""
    backoff: float = 1.0
    """Remote teacher: first retry delay in seconds, doubled each retry (with jitter)."""
    shard_rows: int = 10000
    """Rows per output shard traces-NNNNN.jsonl."""
    out: str = ""
    """Output directory; an existing one is resumed (done prompts are skipped)."""
    seed: int = 0
    """Seed for the prompt draw and the teacher's sampling."""
    threads: int = 0
    """torch CPU threads for a local teacher; 0 uses every core this process may run on."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("--out: give the output directory (rerun with it to resume)")
        if not self.teacher and not self.base_url:
            raise ValueError(
                "give --teacher DIR (a local model) or --base-url URL (a chat endpoint)"
            )
        if self.base_url and not self.api_model:
            raise ValueError("--base-url needs --api-model (the model name at the endpoint)")
        if self.samples < 1 or self.n_prompts < 1 or self.chunk < 1:
            raise ValueError("samples, n_prompts and chunk must be positive")
        if min(self.max_new_tokens, self.shard_rows, self.concurrency) < 1 or self.timeout <= 0:
            raise ValueError("max_new_tokens, shard_rows, concurrency and timeout must be positive")
        if self.max_retries < 0 or self.backoff < 0:
            raise ValueError("max_retries and backoff must be >= 0")
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # validates them
        TASKS.get(self.task)

    def filters(self) -> TraceFilters:
        return TraceFilters(self.max_chars, self.min_script_share, self.near_dup)


def load_prompts(cfg: DistillGenerateConfig) -> list[Problem]:
    """The prompts, with unique ids; held-out and benchmark problems are never included."""
    task = get_task(cfg.task)
    exclude = excluded(cfg.task)
    if cfg.prompts:
        if not Path(cfg.prompts).exists():
            raise FileNotFoundError(f"--prompts: {cfg.prompts} does not exist")
        problems = [p for p in task.load_jsonl(cfg.prompts) if task.canonical(p) not in exclude]
        if not problems:
            raise DataError(f"{cfg.prompts}: no problems (--prompts; held-out ones are left out)")
    else:
        rng = random.Random(cfg.seed)
        seen: set[str] = set()
        problems = []
        for _ in range(50 * cfg.n_prompts):
            if len(problems) == cfg.n_prompts:
                break
            p = sample_excluding(task, rng, exclude)
            if task.canonical(p) not in seen:
                seen.add(task.canonical(p))
                problems.append(p)
    ids = Counter(p.id for p in problems)
    if any(c > 1 for c in ids.values()):
        raise DataError(
            f"{cfg.prompts}: duplicate problem ids {[i for i, c in ids.items() if c > 1][:5]}"
        )
    return problems


def make_teacher(cfg: DistillGenerateConfig) -> Any:
    if cfg.base_url:
        return ChatTeacher(
            cfg.base_url,
            cfg.api_model,
            os.environ.get(cfg.api_key_env, ""),
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            concurrency=cfg.concurrency,
            timeout=cfg.timeout,
            max_retries=cfg.max_retries,
            backoff=cfg.backoff,
        )
    return LocalTeacher(cfg.teacher, cfg.temperature, cfg.top_p, cfg.max_new_tokens)


def distill_generate(cfg: DistillGenerateConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    set_threads(cfg.threads)
    out = RunDir(cfg.out)
    problems = load_prompts(cfg)  # bad prompts stop the run before anything is written
    store = TraceStore(out.path, cfg.shard_rows)
    out.save_config(cfg)
    todo = [p for p in problems if p.id not in store.done]
    teacher = make_teacher(cfg)
    local = isinstance(teacher, LocalTeacher)
    filters = cfg.filters()
    t0 = time.time()
    failed: dict[str, str] = {}

    def info() -> str:
        s = _stats(store, failed)
        return f"accepted {s['accepted']}  rejected {s['rejected']}  failed {len(failed)}"

    def on_interrupt() -> None:  # every prompt with its done-marker is kept
        console.print(f"[yellow]Interrupted: {len(store.done)} prompts done. Rerun to resume.")

    with progress_bar(console) as bar, interruptible(on_interrupt):
        done = len(problems) - len(todo)
        bar_id = bar.add_task("distill", total=len(problems), completed=done, info=info())
        for start in range(0, len(problems), cfg.chunk):
            part = [p for p in problems[start : start + cfg.chunk] if p.id not in store.done]
            if not part:
                continue
            # seeded by the chunk's start in the full list; see the module docstring
            asked = problems[start : start + cfg.chunk] if local else part
            results = teacher.sample([p.question for p in asked], cfg.samples, cfg.seed + start)
            for p, res in zip(asked, results):
                if p.id in store.done:
                    continue  # written before a kill, from these same draws
                if res.error is not None:
                    failed[p.id] = f"{res.error} (after {res.attempts} attempts)"
                    continue
                kept, rejected = filter_samples(p, res.samples, filters)
                store.write(
                    p.id,
                    [_trace_row(p, teacher.name, res.samples, k) for k in kept],
                    {"accepted": len(kept), "rejected": dict(rejected), "attempts": res.attempts},
                )
            bar.update(bar_id, advance=len(part), info=info())
    stats = _stats(store, failed)
    stats.update(
        teacher=teacher.name,
        prompts=len(problems),
        samples_per_prompt=cfg.samples,
        session_s=round(time.time() - t0, 2),
    )
    atomic.write_json(out / "stats.json", stats)
    console.print(
        f"{stats['prompts_done']}/{len(problems)} prompts done: {stats['accepted']} samples "
        f"accepted, {stats['rejected']} rejected {stats['rejected_by']}, "
        f"{stats['no_sample_prompts']} prompts with none kept.  Traces in {out}"
    )
    if failed:
        console.print(f"[red]{len(failed)} prompts failed[/] (not marked done; rerun to retry):")
        for pid, why in list(failed.items())[:20]:
            console.print(f"  {pid}: {why}")
    return stats


def _trace_row(p: Problem, teacher: str, samples: list, kept: tuple[str, str, str]) -> dict:
    """One kept trace as a row of a trace shard (what `aha sft` reads)."""
    reasoning, answer, completion = kept
    return {
        "prompt": r1_zero_prompt(p.question),
        "reasoning": reasoning,
        "answer": answer,
        "completion": completion,
        "teacher": teacher,
        "verified": True,
        "meta": {
            "prompt_id": p.id,
            "question": p.question,
            "task": p.task,
            "truncated": sum(s.finish_reason == "length" for s in samples),
        },
    }


def _stats(store: TraceStore, failed: dict[str, str]) -> dict[str, Any]:
    by: Counter = Counter()
    accepted = 0
    for m in store.done.values():
        accepted += m["accepted"]
        by.update(m["rejected"])
    return {
        "prompts_done": len(store.done),
        "accepted": accepted,
        "rejected": sum(by.values()),
        "rejected_by": {k: by.get(k, 0) for k in REJECT_REASONS},
        "no_sample_prompts": sum(m["accepted"] == 0 for m in store.done.values()),
        "failed": len(failed),
        "failed_prompts": failed,
    }


# --- the comparison --------------------------------------------------------------------------
@dataclass
class DistillConfig:
    teacher: str = "runs/zero-countdown/final"
    """The teacher: a model directory trained by `aha zero` (the default is the final/ of `aha zero --out runs/zero-countdown`)."""
    student_recipe: str = "recipes/pretrain-student.yaml"
    """`aha pretrain` recipe of the smaller student base model (built once, not timed)."""
    task: str = "countdown"
    """Task for traces, RL prompts and held-out evaluation."""
    seeds: str = "0,1,2"
    """Seeds, comma-separated: each arm runs once per seed."""
    n_prompts: int = 3000
    """Arm A: teacher prompts (distinct, none held out)."""
    samples: int = 4
    """Arm A: teacher samples per prompt (verified ones are kept)."""
    teacher_temperature: float = 1.0
    """Arm A: teacher sampling temperature."""
    sft_epochs: float = 3.0
    """Arm A: SFT epochs over the verified traces."""
    sft_lr: float = 2e-3
    """Arm A: SFT peak learning rate."""
    sft_batch_size: int = 64
    """Arm A: sequences per SFT step."""
    rl_lrs: str = "2e-4,5e-4,1e-3"
    """Arm B: GRPO learning rates tried; the best (held-out pass@1) is reported."""
    rl_steps: int = 200
    """Arm B: GRPO steps (set so that arm B gets at least arm A's wall time)."""
    rl_match_wall: bool = True
    """Arm B: extend GRPO by rl_extend steps at a time until its wall time is at least arm A's."""
    rl_extend: int = 50
    """Arm B: steps per extension (and the checkpoint interval)."""
    rl_recipe: str = "recipes/zero-countdown-full.yaml"
    """Arm B: `aha zero` recipe (its model, steps, lr, seed and evaluation fields are overridden)."""
    heldout_n: int = 500
    """Held-out problems in the final evaluation of both arms."""
    eval_k: int = 4
    """Samples per problem for pass@1 (mean over k)."""
    real_eval: bool = True
    """Also evaluate both arms on the packaged real Countdown sample."""
    out: str = "runs/distill"
    """Run directory (each arm and seed in its own subdirectory; finished parts are reused)."""
    threads: int = 0
    """torch CPU threads; 0 uses every core this process may run on."""

    def __post_init__(self) -> None:
        if not self.seed_list() or not self.lr_list():
            raise ValueError("seeds and rl_lrs need at least one value each")
        TASKS.get(self.task)

    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",") if s.strip()]

    def lr_list(self) -> list[float]:
        return [float(s) for s in self.rl_lrs.split(",") if s.strip()]


def _eval_model(path: Path, cfg: DistillConfig, seed: int) -> dict[str, Any]:
    return heldout_figures(
        load_model(path).eval(),
        load_tokenizer(path),
        cfg.task,
        cfg.heldout_n,
        k=cfg.eval_k,
        temperature=1.0,
        max_new_tokens=128,
        seed=seed,
        real=cfg.real_eval,
    )


def _cached(path: Path, fn) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    result = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, result)
    return result


def distill(cfg: DistillConfig, console: Console | None = None) -> dict[str, Any]:
    from ahamoment.stages.sft import SFTConfig, sft
    from ahamoment.stages.zero import ZeroConfig, zero

    console = console or Console()
    if not (Path(cfg.teacher) / "config.json").exists():
        raise FileNotFoundError(
            f"--teacher {cfg.teacher}: no model there; train one with "
            "`aha zero --out runs/zero-countdown`, or pass --teacher DIR"
        )
    set_threads(cfg.threads)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, run / "config.yaml")
    student = ensure_base_model("", cfg.task, cfg.student_recipe, cfg.threads, console)
    console.print(f"[bold]Student base model:[/] {student}   [bold]teacher:[/] {cfg.teacher}")
    arms: dict[str, list[dict[str, Any]]] = {"sft": [], "rl": []}
    for seed in cfg.seed_list():
        # Arm A: teacher sampling + SFT (both timed)
        def arm_a(seed: int = seed) -> dict[str, Any]:
            gen_dir = run / f"sft-seed{seed}" / "traces"
            g = distill_generate(
                DistillGenerateConfig(
                    teacher=cfg.teacher,
                    task=cfg.task,
                    n_prompts=cfg.n_prompts,
                    samples=cfg.samples,
                    temperature=cfg.teacher_temperature,
                    out=str(gen_dir),
                    seed=seed,
                    threads=cfg.threads,
                ),
                console,
            )
            s = sft(
                SFTConfig(
                    data=str(gen_dir),
                    model=str(student),
                    task=cfg.task,
                    epochs=cfg.sft_epochs,
                    lr=cfg.sft_lr,
                    batch_size=cfg.sft_batch_size,
                    heldout_n=0,
                    out=str(run / f"sft-seed{seed}" / "train"),
                    seed=seed,
                    threads=cfg.threads,
                ),
                console,
            )
            ev = _eval_model(run / f"sft-seed{seed}" / "train" / "final", cfg, 10_000)
            return {
                "seed": seed,
                "traces": g["accepted"],
                "wall_s": g["session_s"] + s["train_s"],
                "teacher_s": g["session_s"],
                "train_s": s["train_s"],
                **ev,
            }

        arms["sft"].append(_cached(run / f"sft-seed{seed}" / "result.json", arm_a))

        # Arm B: GRPO on the same student, best of the learning rates (training steps timed)
        tried = []
        for lr in cfg.lr_list():

            def arm_b(seed: int = seed, lr: float = lr) -> dict[str, Any]:
                d = run / f"rl-seed{seed}-lr{lr:g}"
                target_s = arms["sft"][-1]["wall_s"] if cfg.rl_match_wall else 0.0
                steps, wall = cfg.rl_steps, 0.0
                while True:
                    zcfg = cfglib.build(
                        ZeroConfig,
                        cfg.rl_recipe if Path(cfg.rl_recipe).exists() else None,
                        model=str(student),
                        task=cfg.task,
                        steps=steps,
                        lr=lr,
                        seed=seed,
                        eval_every=0,
                        eval_n=20,
                        heldout_n=20,
                        eval_k=1,
                        real_eval=False,
                        save_every=cfg.rl_extend,
                        out=str(d / "train"),
                        resume=True,
                        threads=cfg.threads,
                    )
                    zero(zcfg, console)
                    rows = [json.loads(ln) for ln in (d / "train" / "metrics.jsonl").open()]
                    wall = sum(r["step_s"] for r in rows)  # training steps only, no evaluation
                    if wall >= target_s:
                        break
                    steps += cfg.rl_extend  # the lr is constant after warm-up: extending is clean
                ev = _eval_model(d / "train" / "final", cfg, 10_000)
                return {
                    "seed": seed,
                    "lr": lr,
                    "steps": steps,
                    "wall_s": round(wall, 2),
                    **ev,
                }

            tried.append(_cached(run / f"rl-seed{seed}-lr{lr:g}" / "result.json", arm_b))
        best = max(tried, key=lambda r: r["heldout"]["pass1"])
        arms["rl"].append(
            {**best, "lrs_tried": {str(r["lr"]): r["heldout"]["pass1"] for r in tried}}
        )

    summary = {arm: summarize_arm(rows) for arm, rows in arms.items()}
    summary["config"] = cfglib.to_dict(cfg)
    summary["student"] = str(student)
    atomic.write_json(run / "summary.json", summary)
    print_table(summary, console)
    return summary


def _mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize_arm(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": rows, "n_seeds": len(rows)}
    out["heldout_pass1"] = _mean_sd([r["heldout"]["pass1"] for r in rows])
    out["heldout_greedy"] = _mean_sd([r["heldout"]["greedy_acc"] for r in rows])
    out["mean_len"] = _mean_sd([r["heldout"]["mean_len"] for r in rows])
    out["wall_s"] = _mean_sd([r["wall_s"] for r in rows])
    if all("real" in r for r in rows):
        for n in ("3_numbers", "4_numbers"):
            out[f"real_{n}_pass1"] = _mean_sd([r["real"][n]["pass1"] for r in rows])
    return out


def print_table(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="Distillation (A: SFT on teacher traces) vs RL (B: GRPO) on the student")
    table.add_column("metric")
    table.add_column("A: sft", justify="right")
    table.add_column("B: rl", justify="right")

    def fmt(arm: str, key: str, digits: int = 3) -> str:
        v = summary[arm].get(key)
        return "" if v is None else f"{v['mean']:.{digits}f} ± {v['sd']:.{digits}f}"

    for key, label, d in [
        ("heldout_pass1", "held-out pass@1 (sampled)", 3),
        ("heldout_greedy", "held-out greedy accuracy", 3),
        ("real_3_numbers_pass1", "real Countdown 3 numbers pass@1", 3),
        ("real_4_numbers_pass1", "real Countdown 4 numbers pass@1", 3),
        ("mean_len", "mean length (tokens)", 1),
        ("wall_s", "wall time (s)", 0),
    ]:
        table.add_row(label, fmt("sft", key, d), fmt("rl", key, d))
    console.print(table)
    console.print(f"seeds: {summary['sft']['n_seeds']} (mean ± sd)")


def main(argv: list[str] | None = None) -> int:
    import sys

    from ahamoment.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        return run_stage("distill-generate", argv[1:])
    return run_stage("distill", argv)


if __name__ == "__main__":
    raise SystemExit(main())
