"""`aha eval`: accuracy of a model on held-out problems or a JSONL file, at R1's settings.

For each problem: k samples (T=0.6, top-p 0.95 by default, as DeepSeek-R1 reports pass@1) and
one greedy decode, each judged by the task's verifier. Reported: pass@1 (mean correctness over
the k samples), cons@k (majority vote over the normalised extracted answers, ties to the first
seen), pass@k (unbiased estimator), greedy accuracy, completion lengths and the rate of answers
that fail to parse; each figure with the T, top-p, n and k that produced it.

The loop: for each run (the plain one, then one per thinking budget), for each chunk of
problems: sample, judge, append the chunk's records to ``results.jsonl`` (flushed). Ctrl-C
keeps every finished chunk; rerunning with the same ``--out`` skips the problems already there.
Chunks are seeded by their position, so a resumed evaluation equals an uninterrupted one, and
every run draws from the same seeds (a budget that never binds repeats the plain run exactly).

Models: a local directory (default: the embedded default model, built on first use) through a
rollout engine, or any OpenAI-compatible endpoint (``--base-url``), which gets text prompts.

Test-time compute (``--budgets``, ``--min-think``): budget forcing as in s1 (Muennighoff et al.
2025; ``rollout/budget.py``). Each budget B is one more run in which thinking is cut at B tokens
(``</think>\\n<answer>`` is forced, then the model writes its answer within ``answer_tokens``);
``--min-think`` replaces an earlier end of thinking by "Wait". The curve goes to budgets.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from ahamoment import config as cfglib
from ahamoment.base_models import ensure_base_model, reversed_digits
from ahamoment.data import read_jsonl
from ahamoment.evaluation import ProblemRunner, score_problem, summarize
from ahamoment.metrics import SampleSettings
from ahamoment.models import load_model, load_tokenizer, set_threads
from ahamoment.progress import progress_bar
from ahamoment.rollout import ENGINES, Engine, ThinkingBudget, make_engine
from ahamoment.runs import RunDir, interruptible
from ahamoment.splits import HELDOUT_RESERVE, heldout
from ahamoment.tasks import TASKS, get_task
from ahamoment.tasks.base import Problem

DEFAULT_TASK = "countdown"
COUNTDOWN_FILE_TASK = "countdown_tinyzero"  # reads rows with `nums` and `target`
# Fields that may change between a run and its resumption; any other change is refused.
RESUMABLE = ("n", "budgets", "out", "threads")


@dataclass
class EvalConfig:
    model: str = ""
    """Local HF causal-LM directory. Empty (and no --base-url): the embedded default, built by `aha pretrain` on first use."""
    pretrain_recipe: str = ""
    """With no --model: YAML recipe for the embedded default model built on first use."""
    base_url: str = ""
    """OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (prompts go as text; key from $OPENAI_API_KEY)."""
    api_model: str = ""
    """Model name at --base-url; empty: the first model the server lists."""
    task: str = ""
    """Built-in task whose held-out problems are evaluated (default countdown); with --data, the task whose loader reads the file (default: from the rows)."""
    data: str = ""
    """JSONL problems: rows with nums/target are Countdown (graded by its verifier), rows with problem/answer go to the math grader, MBPP rows (text, code, test_list) and HumanEval rows (prompt, test, entry_point) run in the code sandbox."""
    n: int = 200
    """Problems: the first N held-out problems, or the first N rows of --data (0: all)."""
    k: int = 4
    """Samples per problem: pass@1 is their mean correctness; pass@k and cons@k use all k."""
    temperature: float = 0.6
    """Sampling temperature (DeepSeek-R1 evaluates at 0.6)."""
    top_p: float = 0.95
    """Nucleus sampling mass (DeepSeek-R1: 0.95)."""
    max_new_tokens: int = 128
    """Longest completion (finish reason 'length' beyond it)."""
    greedy: bool = True
    """Also decode each problem greedily, for greedy accuracy."""
    budgets: str = ""
    """Maximum thinking budgets in tokens, comma-separated (e.g. 16,32,64): one more run each, with s1 budget forcing; written to budgets.json."""
    min_think: int = 0
    """Minimum thinking tokens (s1): an earlier end of thinking is replaced by --wait-text (0: off). Applies to every run."""
    wait_text: str = "Wait"
    """Text written in place of an early end of thinking."""
    answer_tokens: int = 32
    """With a budget B: the completion may run to B + this many tokens (forced '</think>\\n<answer>' plus the answer)."""
    engine: str = "torch"
    """Engine for a local model: torch (our sampler, fused decoding step), torch-eager (plain torch ops), hf, vllm; budget forcing needs torch or torch-eager."""
    chunk: int = 16
    """Problems per generation batch; results.jsonl is appended after each."""
    out: str = ""
    """Output directory (results.jsonl, summary.json, budgets.json); empty: runs/eval-<timestamp>. Rerun with the same --out to resume."""
    seed: int = 0
    """Seed of the sampling draws."""
    threads: int = 0
    """torch CPU threads; 0 uses every core this process may run on."""

    def __post_init__(self) -> None:
        SampleSettings(self.temperature, self.top_p, self.k, self.k)  # validates them
        if self.n < 0 or self.chunk < 1 or self.max_new_tokens < 1 or self.answer_tokens < 1:
            raise ValueError("n must be >= 0; chunk, max_new_tokens and answer_tokens >= 1")
        if not self.data and self.n > HELDOUT_RESERVE:
            raise ValueError(f"at most {HELDOUT_RESERVE} held-out problems are reserved; lower n")
        if not self.data and self.n == 0:
            raise ValueError("n=0 (all) needs --data; give a number of held-out problems")
        if self.base_url and self.model:
            raise ValueError(
                "give --model (a local directory) or --base-url (an endpoint), not both"
            )
        if self.task:
            TASKS.get(self.task)
        if not self.base_url:
            ENGINES.get(self.engine)
        budgets = self.budget_list()
        if budgets or self.min_think:
            if self.base_url or not getattr(ENGINES.get(self.engine), "budget_forcing", False):
                raise ValueError(
                    "budget forcing (--budgets, --min-think) needs a local model on the torch "
                    "engine: other engines cannot replace tokens during decoding"
                )
            if self.min_think < 0 or self.min_think >= self.max_new_tokens:
                raise ValueError("min_think must be in [0, max_new_tokens)")
            if budgets and budgets[0] < self.min_think:
                raise ValueError(f"every budget must be >= min_think ({self.min_think})")

    def budget_list(self) -> list[int]:
        """The thinking budgets, sorted; [] when none."""
        try:
            values = sorted({int(b) for b in self.budgets.split(",") if b.strip()})
        except ValueError as e:
            raise ValueError(f"budgets: comma-separated integers, got {self.budgets!r}") from e
        if any(b < 1 for b in values):
            raise ValueError(f"budgets must be positive, got {self.budgets!r}")
        return values

    def max_tokens(self, budget: int | None) -> int:
        """Completion cap of a run: max_new_tokens, or budget + answer_tokens when forced."""
        return self.max_new_tokens if budget is None else budget + self.answer_tokens


# --- problems -------------------------------------------------------------------------------
def _row_kind(path: str) -> str:
    """'countdown' for rows with nums and target, 'math' for problem and answer, 'code' for
    MBPP (test_list) and HumanEval (prompt, test, entry_point) rows."""
    for lineno, row in read_jsonl(path):
        if "nums" in row and "target" in row:
            return "countdown"
        if "problem" in row and "answer" in row:
            return "math"
        if "test_list" in row or {"prompt", "test", "entry_point"} <= set(row):
            return "code"
        raise ValueError(
            f"{path}:{lineno}: cannot tell the task from the fields {sorted(row)}; rows need "
            "nums and target (Countdown), problem and answer (math), or test_list (MBPP) or "
            "prompt, test and entry_point (HumanEval) (code), or pass --task"
        )
    raise ValueError(f"{path}: no rows")


def _math_module() -> Any:
    try:
        from ahamoment.tasks import math as math_task
    except ImportError as e:
        raise ValueError(
            "problem/answer rows are graded by the 'math' task (ahamoment.tasks.math), which "
            f"this installation does not have yet ({e})"
        ) from e
    return math_task


def load_problems(cfg: EvalConfig) -> tuple[list[Problem], str]:
    """The problems to evaluate, and a short description of where they come from."""
    if not cfg.data:
        name = cfg.task or DEFAULT_TASK
        return heldout(name, cfg.n), f"{name} held-out"
    if not Path(cfg.data).exists():
        raise FileNotFoundError(f"--data {cfg.data}: no such file")
    kind = "" if cfg.task else _row_kind(cfg.data)
    if cfg.task:
        problems = get_task(cfg.task).load_jsonl(cfg.data)
    elif kind == "countdown":  # graded by the verifier, never by `answer`
        problems = get_task(COUNTDOWN_FILE_TASK).load_jsonl(cfg.data)
    elif kind == "code":  # run in the sandbox against the file's asserts
        problems = get_task("code").load_jsonl(cfg.data)
    else:
        problems = _math_module().load_problem_jsonl(cfg.data)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.data}: problem ids must be unique (results are resumed by id)")
    problems = problems[: cfg.n] if cfg.n else problems
    return problems, f"{Path(cfg.data).name} ({problems[0].task if problems else '-'})"


# --- run directory --------------------------------------------------------------------------
def _check_resumable(cfg: EvalConfig, out: Path) -> None:
    """Refuse to mix records made with other settings into one results.jsonl."""
    saved_path = out / "config.yaml"
    if not (out / "results.jsonl").exists() or not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = cfglib.to_dict(cfg)
    changed = [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in RESUMABLE and saved.get(k) != v
    ]
    if changed:
        raise FileExistsError(
            f"{out} holds results made with other settings ({'; '.join(changed)}); "
            "pass another --out, or the same settings to resume"
        )


def _read_results(path: Path) -> dict[tuple[int | None, str], dict[str, Any]]:
    """Records already written, by (budget, problem id); a torn last line is dropped."""
    done: dict[tuple[int | None, str], dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: that chunk is sampled again
        if "steps" in rec:  # older records lack fields the summary needs: sampled again
            done[(rec.get("budget"), rec["id"])] = rec
    return done


def _chunk_generator(seed: int, start: int) -> torch.Generator:
    """Draws of one chunk, fixed by (seed, position): resuming draws the same samples, and
    every budget run starts from the same draws (common random numbers), so a budget that
    never binds reproduces the plain run exactly and the curve shows the forcing, not noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + start)


def _ensure_model(cfg: EvalConfig, console: Console) -> Path:
    task = cfg.task if cfg.task and not cfg.data else DEFAULT_TASK
    if cfg.data and (cfg.task or _row_kind(cfg.data)) == "code":
        task = "code"  # a code file: the embedded code base
    return ensure_base_model(cfg.model, task, cfg.pretrain_recipe, cfg.threads, console)


def _endpoint(cfg: EvalConfig) -> tuple[Engine, str]:
    import openai

    engine = make_engine("openai", cfg.api_model or None, None, base_url=cfg.base_url)
    try:
        served = [m.id for m in engine.client.models.list()]  # type: ignore[attr-defined]
    except openai.APIConnectionError as e:
        raise ValueError(f"--base-url {cfg.base_url}: cannot connect ({e})") from e
    except openai.NotFoundError:
        served = []  # a server without /v1/models: take the name on trust
    name = engine.model  # type: ignore[attr-defined]
    if served and name not in served:
        raise ValueError(f"{cfg.base_url} does not serve {name!r}; it serves {served}")
    return engine, f"{name} @ {cfg.base_url}"


# --- the stage ------------------------------------------------------------------------------
def evaluate_model(cfg: EvalConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    set_threads(cfg.threads)
    t_start = time.time()
    out = RunDir.resolve(cfg.out, "eval")
    problems, source = load_problems(cfg)
    if not problems:
        raise ValueError(f"no problems to evaluate in {source}")
    _check_resumable(cfg, out.path)

    reverse = False
    if cfg.base_url:
        engine, model_name = _endpoint(cfg)
        runner = ProblemRunner(engine)
    else:
        path = _ensure_model(cfg, console)
        tokenizer = load_tokenizer(path)
        engine = make_engine(cfg.engine, load_model(path), tokenizer)
        runner, model_name, reverse = (
            ProblemRunner(engine, tokenizer),
            str(path),
            reversed_digits(path),
        )
    out.save_config(cfg)
    done = _read_results(out / "results.jsonl")

    runs: list[int | None] = [None, *cfg.budget_list()]  # None: no maximum budget
    total = len(runs) * len(problems)
    finished = sum((b, p.id) in done for b in runs for p in problems)
    console.print(
        f"[bold]aha eval[/] {model_name} on {len(problems)} problems ({source}); "
        f"k={cfg.k}, T={cfg.temperature}, top-p={cfg.top_p} -> {out}"
        + (f"  [yellow]resuming: {finished}/{total} done" if finished else "")
    )

    def on_interrupt() -> None:  # finished chunks are in results.jsonl already
        console.print(
            f"[yellow]Interrupted: finished chunks are kept in {out}; run the same `aha eval` "
            "again to resume."
        )

    with progress_bar(console) as bar, interruptible(on_interrupt):
        bar_id = bar.add_task("aha eval", total=total, completed=finished, info="")
        for budget in runs:
            forcing = None
            if budget is not None or cfg.min_think:
                forcing = ThinkingBudget.from_tokenizer(
                    runner.tokenizer, budget, cfg.min_think, wait=cfg.wait_text
                )
            max_new = cfg.max_tokens(budget)
            sampled = runner.params(cfg.temperature, cfg.top_p, max_new, forcing)
            greedy = runner.params(0.0, 1.0, max_new, forcing)
            for start in range(0, len(problems), cfg.chunk):
                # 1. the chunk's problems not yet in results.jsonl
                chunk = problems[start : start + cfg.chunk]
                todo = [p for p in chunk if (budget, p.id) not in done]
                if not todo:
                    continue
                # 2. k samples and one greedy decode per problem, in one batch: the whole chunk,
                # so the draws are the same when a kill left part of it written
                requests = [runner.request(p, sampled, cfg.k) for p in chunk]
                if cfg.greedy:
                    requests += [runner.request(p, greedy, 1) for p in chunk]
                got = runner.run(requests, _chunk_generator(cfg.seed, start))
                # 3. judge, then append the chunk's records in one flushed write
                recs = []
                for i, p in enumerate(chunk):
                    if p not in todo:
                        continue  # written before the kill, from these same draws
                    g = got[len(chunk) + i][0] if cfg.greedy else None
                    rec = {"budget": budget, "min_think": cfg.min_think}
                    rec |= score_problem(p, got[i], g, reverse)
                    done[(budget, p.id)] = rec
                    recs.append(rec)
                out.append("results.jsonl", *recs)
                run_recs = [done[(budget, q.id)] for q in problems if (budget, q.id) in done]
                pass1 = sum(r["pass1"] for r in run_recs) / len(run_recs)
                label = f"budget {budget}" if budget else "plain"
                bar.update(bar_id, advance=len(todo), info=f"{label}  pass@1 {pass1:.3f}")

    # 4. summaries: the plain run in summary.json, the budget curve in budgets.json
    def settings(budget: int | None) -> dict[str, Any]:
        return SampleSettings(cfg.temperature, cfg.top_p, cfg.k, cfg.k).as_dict() | {
            "max_new_tokens": cfg.max_tokens(budget),
            "max_think": budget,
            "min_think": cfg.min_think,
            "seed": cfg.seed,
        }

    by_run = {b: summarize([done[(b, p.id)] for p in problems], settings(b)) for b in runs}
    summary = by_run[None] | {
        "model": model_name,
        "source": source,
        "wall_s": round(time.time() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary, console)
    if len(runs) > 1:
        curve = {"source": source, "model": model_name, "runs": list(by_run.values())}
        (out / "budgets.json").write_text(json.dumps(curve, indent=1))
        print_budgets(curve, console)
    console.print(f"results: {out / 'results.jsonl'}   summary: {out / 'summary.json'}")
    return summary


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_summary(s: dict[str, Any], console: Console) -> None:
    st = s["settings"]
    k = st["k"]
    table = Table(
        title=f"aha eval: {s['source']}, n={s['n']} problems, k={k} samples "
        f"(T={st['temperature']}, top-p={st['top_p']}, max {st['max_new_tokens']} new tokens"
        + (f", min think {st['min_think']}" if st["min_think"] else "")
        + ")"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("measured at")
    sampled = f"T={st['temperature']}, top-p={st['top_p']}, n={s['n']}, k={k}"
    rows = [
        ("pass@1 (mean of k)", s["pass1"], sampled),
        (f"cons@{k} (majority vote)", s["consk"], sampled),
        (f"pass@{k}", s["passk"], sampled),
        ("greedy accuracy", s["greedy_acc"], f"T=0, n={s['n']}"),
        ("answer parse-fail rate", s["parse_fail_rate"], sampled),
        ("format rate", s["format_rate"], sampled),
        ("truncated rate", s["truncated_rate"], sampled),
        ("reflection rate", s["reflection_rate"], sampled),
        ("self-correction rate", s["self_correction_rate"], sampled),
        ("language-mixing rate", s["mixing_rate"], sampled),
        ("correct arithmetic steps", s["step_accuracy"], sampled),
    ]
    for label, value, at in rows:
        table.add_row(label, _fmt(value), at)
    table.add_row("mean length (tokens)", _fmt(s["mean_len"], 1), sampled)
    table.add_row("p90 length (tokens)", _fmt(s["p90_len"], 1), sampled)
    console.print(table)


def print_budgets(curve: dict[str, Any], console: Console) -> None:
    first = curve["runs"][0]
    st = first["settings"]
    table = Table(
        title=f"Accuracy against the thinking budget (s1 budget forcing): {curve['source']}, "
        f"n={first['n']}, k={st['k']}, T={st['temperature']}, top-p={st['top_p']}"
        + (f", min think {st['min_think']}" if st["min_think"] else "")
    )
    for col in ("max thinking", "max tokens", "pass@1", "greedy", f"cons@{st['k']}"):
        table.add_column(col, justify="right")
    table.add_column("mean thinking", justify="right")
    table.add_column("mean length", justify="right")
    for r in curve["runs"]:
        s = r["settings"]
        table.add_row(
            "none" if s["max_think"] is None else str(s["max_think"]),
            str(s["max_new_tokens"]),
            _fmt(r["pass1"]),
            _fmt(r["greedy_acc"]),
            _fmt(r["consk"]),
            _fmt(r["mean_think"], 1),
            _fmt(r["mean_len"], 1),
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("eval", argv)


if __name__ == "__main__":
    raise SystemExit(main())
