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
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from ahamoment import config as cfglib
from ahamoment.data import read_jsonl
from ahamoment.evaluation import stop_ids
from ahamoment.metrics import SampleSettings, length_stats, majority_vote, pass_at_k
from ahamoment.models import load_model, load_tokenizer, r1_zero_prompt, set_threads
from ahamoment.progress import progress_bar
from ahamoment.rewards import format_reward, judge
from ahamoment.rollout import (
    ENGINES,
    Completion,
    Engine,
    Request,
    SamplingParams,
    TextRequest,
    ThinkingBudget,
    make_engine,
)
from ahamoment.rollout.budget import THINK_END
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
    """JSONL problems: rows with nums/target are Countdown (graded by its verifier), rows with problem/answer go to the math grader."""
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
    """Engine for a local model (torch, hf, vllm); budget forcing needs torch."""
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
            if self.base_url or self.engine != "torch":
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
    """'countdown' for rows with nums and target, 'math' for problem and answer."""
    for lineno, row in read_jsonl(path):
        if "nums" in row and "target" in row:
            return "countdown"
        if "problem" in row and "answer" in row:
            return "math"
        raise ValueError(
            f"{path}:{lineno}: cannot tell the task from the fields {sorted(row)}; rows need "
            "nums and target (Countdown) or problem and answer (math), or pass --task"
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
    if cfg.task:
        problems = get_task(cfg.task).load_jsonl(cfg.data)
    elif _row_kind(cfg.data) == "countdown":  # graded by the verifier, never by `answer`
        problems = get_task(COUNTDOWN_FILE_TASK).load_jsonl(cfg.data)
    else:
        problems = _math_module().load_problem_jsonl(cfg.data)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.data}: problem ids must be unique (results are resumed by id)")
    problems = problems[: cfg.n] if cfg.n else problems
    return problems, f"{Path(cfg.data).name} ({problems[0].task if problems else '-'})"


def prompt_text(problem: Problem) -> str:
    """The R1-Zero prompt of a problem (math problems get the math task's answer instruction)."""
    question = problem.question
    math_task = sys.modules.get("ahamoment.tasks.math")  # a math problem implies it is loaded
    if math_task is not None and isinstance(get_task(problem.task), math_task.MathTask):
        if math_task.MATH_PROMPT_SUFFIX not in question:
            question = f"{question} {math_task.MATH_PROMPT_SUFFIX}"
    return r1_zero_prompt(question)


# --- sampling -------------------------------------------------------------------------------
@dataclass
class Sample:
    text: str
    length: int | None  # completion tokens; None when the server did not say
    think: int | None  # tokens before </think> (all of them if it never closes); None: unknown
    finish: str


class Sampler:
    """Prompts in, decoded samples out: token-id prompts for a local model (``tokenizer``
    set), text prompts for an endpoint (``tokenizer`` None)."""

    def __init__(self, engine: Engine, tokenizer: Any = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.stop_ids, self.stop = stop_ids(tokenizer), ()
            end = tokenizer.convert_tokens_to_ids(THINK_END)
            self.end_id = end if isinstance(end, int) and end != tokenizer.unk_token_id else None
        else:  # an endpoint: its own EOS ends a completion; </answer> by text
            self.stop_ids, self.stop, self.end_id = (), ("</answer>",), None

    def params(
        self, temperature: float, top_p: float, max_new: int, budget: ThinkingBudget | None = None
    ) -> SamplingParams:
        return SamplingParams(temperature, top_p, 0, max_new, self.stop_ids, self.stop, budget)

    def request(self, problem: Problem, params: SamplingParams, n: int) -> Request | TextRequest:
        text = prompt_text(problem)
        if self.tokenizer is None:
            return TextRequest(text, params, n)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Request(ids, params, n)

    def read(self, c: Completion) -> Sample:
        if c.text is not None:  # an endpoint: text, maybe per-token log-probs
            n = len(c.logprobs) or None
            return Sample(c.text, n, None, c.finish_reason)
        body = [t for t in c.ids if t != self.tokenizer.eos_token_id]
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        think = c.ids.index(self.end_id) if self.end_id in c.ids else len(c.ids)
        return Sample(text, len(c.ids), think, c.finish_reason)

    def run(
        self, requests: list[Request | TextRequest], generator: torch.Generator
    ) -> list[list[Sample]]:
        return [[self.read(c) for c in cs] for cs in self.engine.generate(requests, generator)]


# --- scoring --------------------------------------------------------------------------------
def score_problem(
    problem: Problem, samples: list[Sample], greedy: Sample | None = None
) -> dict[str, Any]:
    """One results.jsonl record: every sample judged, plus pass@1, pass@k and cons@k."""
    task = get_task(problem.task)
    answers: list[str | None] = []
    correct, parsed = [], []
    for s in samples:
        ans, verdict = judge(problem, s.text)
        answers.append(task.normalize(ans) if ans is not None else None)
        correct.append(verdict.correct)
        parsed.append(verdict.parsed)
    k, c = len(samples), sum(correct)
    rec: dict[str, Any] = {
        "id": problem.id,
        "task": problem.task,
        "question": problem.question,
        "gold": problem.answer,
        "k": k,
        "n_correct": c,
        "pass1": c / k,
        "passk": pass_at_k(k, c, k),
        "cons": majority_vote(answers, correct),
        "answers": answers,
        "correct": correct,
        "parsed": parsed,
        "format": [format_reward(problem, s.text) == 1.0 for s in samples],
        "lengths": [s.length for s in samples],
        "think": [s.think for s in samples],
        "finish": [s.finish for s in samples],
        "samples": [s.text for s in samples],
    }
    if greedy is not None:
        g_ans, g_verdict = judge(problem, greedy.text)
        rec.update(
            greedy=greedy.text,
            greedy_answer=g_ans,
            greedy_correct=g_verdict.correct,
            greedy_length=greedy.length,
        )
    return rec


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """summary.json from the records of one run: pass@1, cons@k, pass@k and greedy accuracy
    are means over problems, rates and lengths over samples. ``n`` counts problems; the
    ``settings`` (``SampleSettings``) name the samples drawn per problem ``n`` too."""
    flat = lambda key: [x for r in records for x in r[key]]  # noqa: E731
    lengths = [x for x in flat("lengths") if x is not None]
    greedy = [r["greedy_correct"] for r in records if "greedy_correct" in r]
    return {
        "pass1": _mean([r["pass1"] for r in records]),
        "consk": _mean([float(r["cons"]) for r in records]),
        "passk": _mean([r["passk"] for r in records]),
        "greedy_acc": _mean([float(g) for g in greedy]) if greedy else None,
        "parse_fail_rate": _mean([float(not p) for p in flat("parsed")]),
        "format_rate": _mean([float(f) for f in flat("format")]),
        "mean_len": length_stats(lengths)["mean"] if lengths else None,
        "p90_len": length_stats(lengths)["p90"] if lengths else None,
        "mean_think": _mean(flat("think")),
        "truncated_rate": _mean([float(f == "length") for f in flat("finish")]),
        "n": len(records),
        "k": settings["k"],
        "settings": settings,
    }


# --- run directory --------------------------------------------------------------------------
def _resolve_out(cfg: EvalConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


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
        done[(rec.get("budget"), rec["id"])] = rec
    return done


def _chunk_generator(seed: int, start: int) -> torch.Generator:
    """Draws of one chunk, fixed by (seed, position): resuming draws the same samples, and
    every budget run starts from the same draws (common random numbers), so a budget that
    never binds reproduces the plain run exactly and the curve shows the forcing, not noise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + start)


def _ensure_model(cfg: EvalConfig, console: Console) -> Path:
    from ahamoment.stages.pretrain import ensure_base_model

    task = cfg.task if cfg.task and not cfg.data else DEFAULT_TASK
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
    out = _resolve_out(cfg)
    problems, source = load_problems(cfg)
    if not problems:
        raise ValueError(f"no problems to evaluate in {source}")
    _check_resumable(cfg, out)

    if cfg.base_url:
        engine, model_name = _endpoint(cfg)
        sampler = Sampler(engine)
    else:
        path = _ensure_model(cfg, console)
        tokenizer = load_tokenizer(path)
        engine = make_engine(cfg.engine, load_model(path), tokenizer)
        sampler, model_name = Sampler(engine, tokenizer), str(path)
    out.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, out / "config.yaml")
    results_path = out / "results.jsonl"
    done = _read_results(results_path)

    runs: list[int | None] = [None, *cfg.budget_list()]  # None: no maximum budget
    total = len(runs) * len(problems)
    finished = sum((b, p.id) in done for b in runs for p in problems)
    console.print(
        f"[bold]aha eval[/] {model_name} on {len(problems)} problems ({source}); "
        f"k={cfg.k}, T={cfg.temperature}, top-p={cfg.top_p} -> {out}"
        + (f"  [yellow]resuming: {finished}/{total} done" if finished else "")
    )

    def on_sigterm(signum, frame):  # `kill` behaves like Ctrl-C: finished chunks are kept
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with progress_bar(console) as bar, results_path.open("a") as results:
            bar_id = bar.add_task("aha eval", total=total, completed=finished, info="")
            for budget in runs:
                forcing = None
                if budget is not None or cfg.min_think:
                    forcing = ThinkingBudget.from_tokenizer(
                        sampler.tokenizer, budget, cfg.min_think, wait=cfg.wait_text
                    )
                max_new = cfg.max_tokens(budget)
                sampled = sampler.params(cfg.temperature, cfg.top_p, max_new, forcing)
                greedy = sampler.params(0.0, 1.0, max_new, forcing)
                for start in range(0, len(problems), cfg.chunk):
                    # 1. the chunk's problems not yet in results.jsonl
                    todo = [
                        p for p in problems[start : start + cfg.chunk] if (budget, p.id) not in done
                    ]
                    if not todo:
                        continue
                    # 2. k samples and one greedy decode per problem, in one batch
                    requests = [sampler.request(p, sampled, cfg.k) for p in todo]
                    if cfg.greedy:
                        requests += [sampler.request(p, greedy, 1) for p in todo]
                    got = sampler.run(requests, _chunk_generator(cfg.seed, start))
                    # 3. judge, then append the chunk's records (flushed: Ctrl-C keeps them)
                    lines = []
                    for i, p in enumerate(todo):
                        g = got[len(todo) + i][0] if cfg.greedy else None
                        rec = {"budget": budget, "min_think": cfg.min_think}
                        rec |= score_problem(p, got[i], g)
                        done[(budget, p.id)] = rec
                        lines.append(json.dumps(rec) + "\n")
                    results.write("".join(lines))
                    results.flush()
                    run_recs = [done[(budget, q.id)] for q in problems if (budget, q.id) in done]
                    bar.update(
                        bar_id,
                        advance=len(todo),
                        info=f"{'budget ' + str(budget) if budget else 'plain'}  "
                        f"pass@1 {_mean([r['pass1'] for r in run_recs]):.3f}",
                    )
    finally:
        signal.signal(signal.SIGTERM, old_handler)

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
    console.print(f"results: {results_path}   summary: {out / 'summary.json'}")
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
