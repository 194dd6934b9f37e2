"""The one evaluator: sample problems, judge each completion, summarise with `metrics`.

Training (`aha zero`'s periodic and final evaluations, `aha sft`, `aha distill`, `aha r1`) and
`aha eval` score through :func:`score_problem` and summarise through :func:`summarize`, so
every stage reports the same fields, each with the sampling settings that produced it:

- per problem (a ``results.jsonl`` record): every sample judged, its normalised answer,
  format, length, thinking length, finish reason, reflection and self-correction flags and
  arithmetic steps; pass@1 (mean correctness over the k samples), pass@k (unbiased) and
  cons@k (majority vote over the normalised answers, ties to the first seen); the greedy
  decode's verdict when there is one;
- per run (:func:`summarize`): means over problems (pass@1, pass@k, cons@k, greedy
  accuracy) and rates over samples (format, parse failures, truncation, reflection,
  self-correction, language mixing, correct arithmetic steps), lengths.

How problems are sampled differs by caller and is part of what a figure means: training
evaluations draw all k samples of all problems in one batch from one seed (:func:`evaluate`);
`aha eval` draws chunk by chunk, each chunk seeded by its position, so that it can resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ahamoment.metrics import (
    SampleSettings,
    arithmetic_steps,
    has_reflection,
    is_mixed,
    is_self_correction,
    length_stats,
    majority_vote,
    pass_at_k,
    rejected_tries,
    tries,
)
from ahamoment.prompts import encode_prompts, prompt_text, stop_ids, think_end_id
from ahamoment.rewards import format_reward, judge
from ahamoment.rollout import (
    Completion,
    Engine,
    FusedTorchEngine,
    Request,
    SamplingParams,
    TextRequest,
    ThinkingBudget,
)
from ahamoment.splits import heldout, real_countdown
from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem


# --- decoding -------------------------------------------------------------------------------
def decode(tokenizer: Any, c: Completion) -> Completion:
    """Fill in ``c.text`` (EOS dropped, special tokens such as the tags kept) and ``c.think``
    from the token ids; a completion that came back as text is left as it is."""
    if c.text is None:
        body = [t for t in c.ids if t != tokenizer.eos_token_id]
        c.text = tokenizer.decode(body, skip_special_tokens=False)
        end = think_end_id(tokenizer)
        c.think = c.ids.index(end) if end in c.ids else len(c.ids)
    return c


def generate(
    engine: Engine,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[Completion]:
    """One decoded completion per token-id prompt (repeat a prompt for a group)."""
    out = engine.generate([Request(list(p), params) for p in prompts], generator)
    return [decode(tokenizer, c) for [c] in out]


class ProblemRunner:
    """Problems in, decoded completions out: token-id prompts for a local model
    (``tokenizer`` given), text prompts for an endpoint (``tokenizer`` None)."""

    def __init__(self, engine: Engine, tokenizer: Any = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.stop_ids, self.stop = stop_ids(tokenizer), ()
        else:  # an endpoint: its own EOS ends a completion; </answer> by text
            self.stop_ids, self.stop = (), ("</answer>",)

    def params(
        self, temperature: float, top_p: float, max_new: int, budget: ThinkingBudget | None = None
    ) -> SamplingParams:
        return SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new,
            stop_ids=self.stop_ids,
            stop=self.stop,
            budget=budget,
        )

    def request(self, problem: Problem, params: SamplingParams, n: int) -> Request | TextRequest:
        text = prompt_text(problem)
        if self.tokenizer is None:
            return TextRequest(text, params, n)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Request(ids, params, n)

    def run(
        self, requests: Sequence[Request | TextRequest], generator: torch.Generator
    ) -> list[list[Completion]]:
        got = self.engine.generate(requests, generator)  # type: ignore[arg-type]
        return [[decode(self.tokenizer, c) for c in cs] for cs in got]


# --- scoring --------------------------------------------------------------------------------
def score_problem(
    problem: Problem,
    samples: Sequence[Completion],
    greedy: Completion | None = None,
    reversed_digits: bool = False,
) -> dict[str, Any]:
    """One problem's record: every (decoded) sample judged, plus pass@1, pass@k and cons@k.
    ``reversed_digits``: the model writes its reasoning's numbers least-significant digit
    first (read by the arithmetic-step count)."""
    task = get_task(problem.task)
    texts = [s.text or "" for s in samples]
    answers: list[str | None] = []
    correct, parsed = [], []
    for t in texts:
        ans, verdict = judge(problem, t)
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
        "format": [format_reward(problem, t) == 1.0 for t in texts],
        "lengths": [s.length for s in samples],
        "think": [s.think for s in samples],
        "finish": [s.finish_reason for s in samples],
        "reflection": [has_reflection(t) for t in texts],
        "self_correction": [is_self_correction(t) for t in texts],
        "tries": [len(tries(t)) for t in texts],
        "rejections": [list(rejections(problem, t)) for t in texts],
        "mixed": [is_mixed(t) for t in texts],
        "steps": [list(arithmetic_steps(t, reversed_digits)) for t in texts],
        "samples": texts,
    }
    if greedy is not None:
        g_ans, g_verdict = judge(problem, greedy.text or "")
        rec.update(
            greedy=greedy.text,
            greedy_answer=g_ans,
            greedy_correct=g_verdict.correct,
            greedy_length=greedy.length,
        )
    return rec


def rejections(problem: Problem, text: str) -> tuple[int, int]:
    """(really wrong, readable) among the attempts a check rejected in ``text``
    (``metrics.rejected_tries``): an attempt is readable where the task names its answer
    (``tried_answer``), and really wrong where the verifier rejects that answer. (0, 0) for a
    task without ``tried_answer``."""
    task = get_task(problem.task)
    read = getattr(task, "tried_answer", None)
    if read is None:
        return 0, 0
    wrong = n = 0
    for line in rejected_tries(text):
        answer = read(line)
        if answer is not None:
            n += 1
            wrong += not task.verify(problem, answer).correct
    return wrong, n


def _mean(xs: Sequence[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def ratio_of_sums(pairs: Sequence[Sequence[int]]) -> float | None:
    """Sum of firsts over sum of seconds; None when the seconds sum to 0."""
    den = sum(b for _, b in pairs)
    return sum(a for a, _ in pairs) / den if den else None


def summarize(records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """One run's figures from its records: pass@1, pass@k, cons@k and greedy accuracy are
    means over problems; rates and lengths are over samples; step accuracy is correct steps
    over all steps (None without any). ``n`` counts problems; ``settings`` say how the
    samples were drawn (``SampleSettings`` plus the token budget)."""

    def flat(key: str) -> list[Any]:  # records saved before a key existed have none of it
        return [x for r in records for x in r.get(key, ())]

    lengths = [x for x in flat("lengths") if x is not None]
    greedy = [r["greedy_correct"] for r in records if "greedy_correct" in r]
    steps = flat("steps")
    step_total = sum(t for _, t in steps)
    lens = length_stats(lengths) if lengths else {"mean": None, "p90": None}
    return {
        "n": len(records),
        "k": settings["k"],
        "pass1": _mean([r["pass1"] for r in records]),
        "passk": _mean([r["passk"] for r in records]),
        "consk": _mean([float(r["cons"]) for r in records]),
        "greedy_acc": _mean([float(g) for g in greedy]) if greedy else None,
        "format_rate": _mean([float(f) for f in flat("format")]),
        "parse_fail_rate": _mean([float(not p) for p in flat("parsed")]),
        "truncated_rate": _mean([float(f == "length") for f in flat("finish")]),
        "mean_len": lens["mean"],
        "p90_len": lens["p90"],
        "mean_think": _mean(flat("think")),
        "reflection_rate": _mean([float(x) for x in flat("reflection")]),
        "self_correction_rate": _mean([float(x) for x in flat("self_correction")]),
        "tries_mean": _mean(flat("tries")),
        "reflection_correct_rate": _mean(
            [float(x) for r in records for x, ok in zip(r["reflection"], r["correct"]) if ok]
        ),
        "check_precision": ratio_of_sums(flat("rejections")),
        "mixing_rate": _mean([float(x) for x in flat("mixed")]),
        "step_accuracy": sum(ok for ok, _ in steps) / step_total if step_total else None,
        "settings": settings,
    }


# --- training-time evaluation ---------------------------------------------------------------
@dataclass
class EvalResult:
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    greedy: bool = True,
    engine: Engine | None = None,
    reversed_digits: bool = False,
    chunk: int = 128,
) -> EvalResult:
    """k samples of every problem plus one greedy decode each, scored and summarised.

    Problems go ``chunk`` at a time (k + 1 rows each), so memory stays bounded; the samples
    are drawn from one generator seeded with ``seed``, chunk after chunk. ``engine``: any
    rollout engine; without one, our sampler (fused decoding step) on ``model``."""
    engine = engine or FusedTorchEngine(model, tokenizer)
    stops = stop_ids(tokenizer)
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop_ids=stops
    )
    argmax = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=stops)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        prompts = encode_prompts(tokenizer, part)
        sampled = generate(engine, tokenizer, [p for p in prompts for _ in range(k)], sampling, gen)
        best: list[Completion | None] = [None] * len(part)
        if greedy:
            best = list(generate(engine, tokenizer, prompts, argmax, None))
        records += [
            score_problem(p, sampled[i * k : (i + 1) * k], best[i], reversed_digits)
            for i, p in enumerate(part)
        ]
    settings = SampleSettings(temperature, top_p, k, k).as_dict()
    settings["max_new_tokens"] = max_new_tokens
    return EvalResult(summarize(records, settings), records)


@dataclass
class HeldoutSet:
    """A run's held-out evaluations: fixed problems, sampling settings and seed scheme, so that
    each evaluation of a run compares with its start (seed + offset: 0 for the before/after
    table, 7 for the real Countdown sample)."""

    model: Any
    tokenizer: Any
    problems: list[Problem]
    k: int
    temperature: float
    max_new_tokens: int
    seed: int
    top_p: float = 1.0
    engine: Engine | None = None
    reversed_digits: bool = False

    def run(
        self, problems: Sequence[Problem], offset: int, k: int | None = None, greedy: bool = True
    ) -> dict[str, Any]:
        """The summary of ``problems`` drawn from ``seed + offset`` (k: default ``self.k``)."""
        with torch.no_grad():
            return evaluate(
                self.model,
                self.tokenizer,
                problems,
                k=k or self.k,
                greedy=greedy,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                seed=self.seed + offset,
                engine=self.engine,
                reversed_digits=self.reversed_digits,
            ).summary

    def real(self, k: int | None = None, greedy: bool = True) -> dict[str, Any]:
        """Summaries of the real Countdown sample, its 3- and 4-number problems apart."""
        return {f"{n}_numbers": self.run(real_countdown_numbers(n), 7, k, greedy) for n in (3, 4)}


def heldout_figures(
    model: Any,
    tokenizer: Any,
    task: str,
    n: int,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    real: bool = False,
    reversed_digits: bool = False,
) -> dict[str, Any]:
    """``{"heldout": summary}`` of ``model`` on the task's first ``n`` held-out problems, plus
    ``"real"`` (3- and 4-number summaries on the real Countdown sample) when ``real`` and the
    task is a Countdown one. The final evaluation of sft, distill and r1."""
    held = HeldoutSet(
        model=model,
        tokenizer=tokenizer,
        problems=heldout(task, n),
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        reversed_digits=reversed_digits,
    )
    out: dict[str, Any] = {"heldout": held.run(held.problems, 0)}
    if real and task.startswith("countdown"):
        out["real"] = held.real()
    return out


def real_countdown_numbers(n: int) -> list[Problem]:
    """The real Countdown sample's problems with ``n`` numbers."""
    return [p for p in real_countdown() if len(p.fields["nums"]) == n]


def template_baseline(problems: Sequence[Problem]) -> dict[str, Any]:
    """Accuracy of each constant answer template; the best one is the bar RL must clear."""
    if not problems:
        return {"best": None, "best_acc": 0.0, "all": {}}
    task = get_task(problems[0].task)
    scores = {}
    for name, fn in task.templates():
        hits = sum(task.verify(p, fn(p)).correct for p in problems)
        scores[name] = hits / len(problems)
    if not scores:
        return {"best": None, "best_acc": 0.0, "all": {}}
    best = max(scores, key=lambda s: scores[s])
    return {"best": best, "best_acc": scores[best], "all": scores}
