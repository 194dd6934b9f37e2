"""Held-out evaluation shared by every stage: sample, judge, and summarise with `metrics`.

Every figure is reported with the sampling settings that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ahamoment.metrics import (
    SampleSettings,
    has_reflection,
    is_self_correction,
    length_stats,
    majority_vote,
    mixing_rate,
    pass_at_k,
    step_accuracy,
)
from ahamoment.models import r1_zero_prompt
from ahamoment.rewards import format_reward, judge
from ahamoment.rollout import Engine, Request, SamplingParams, TorchEngine
from ahamoment.splits import heldout, real_countdown
from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem


@dataclass
class Generated:
    """Completions for one batch of prompts, decoded."""

    texts: list[str]
    lengths: list[int]
    ids: list[list[int]]
    logprobs: list[list[float]]
    finish: list[str]


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Generation stops at end-of-text or at the closing answer tag."""
    ids = {tokenizer.eos_token_id}
    answer_close = tokenizer.convert_tokens_to_ids("</answer>")
    if isinstance(answer_close, int) and answer_close != tokenizer.unk_token_id:
        ids.add(answer_close)
    return tuple(i for i in ids if i is not None)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]
) -> list[list[int]]:
    texts = [r1_zero_prompt(p.question) for p in problems]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def generate(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    generator: torch.Generator | None,
    batch_size: int = 256,
    engine: Engine | None = None,
) -> Generated:
    """One completion per prompt (repeat a prompt for a group), decoded.

    ``engine`` is any rollout engine (``ahamoment.rollout.ENGINES``); without one, our torch
    sampler runs on ``model`` in chunks of ``batch_size`` rows.
    """
    engine = engine or TorchEngine(model, tokenizer, max_batch_rows=batch_size)
    out = Generated([], [], [], [], [])
    for [c] in engine.generate([Request(list(p), params) for p in prompts], generator):
        body = [t for t in c.ids if t != tokenizer.eos_token_id]
        out.texts.append(tokenizer.decode(body, skip_special_tokens=False))
        out.lengths.append(len(c.ids))
        out.ids.append(c.ids)
        out.logprobs.append(c.logprobs)
        out.finish.append(c.finish_reason)
    return out


@dataclass
class EvalResult:
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    greedy: bool = True,
    batch_size: int = 256,
    engine: Engine | None = None,
    reversed_digits: bool = False,
) -> EvalResult:
    """Greedy accuracy plus pass@1 (mean over k samples), pass@k and cons@k on ``problems``.
    ``reversed_digits``: the model writes its reasoning's numbers least-significant digit
    first (read by step_accuracy)."""
    prompts = encode_prompts(tokenizer, problems)
    stops = stop_ids(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    sampled = generate(
        model,
        tokenizer,
        [p for p in prompts for _ in range(k)],
        SamplingParams(temperature, top_p, 0, max_new_tokens, stops),
        gen,
        batch_size,
        engine,
    )
    greedy_out = (
        generate(
            model,
            tokenizer,
            prompts,
            SamplingParams(0.0, 1.0, 0, max_new_tokens, stops),
            None,
            batch_size,
            engine,
        )
        if greedy
        else None
    )
    records, p1, pk, cons, gacc = [], [], [], [], []
    fmt, refl, selfc, parse_fail = [], [], [], []
    for i, prob in enumerate(problems):
        task = get_task(prob.task)
        texts = sampled.texts[i * k : (i + 1) * k]
        answers, correct = [], []
        for t in texts:
            ans, verdict = judge(prob, t)
            answers.append(task.normalize(ans) if ans is not None else None)
            correct.append(verdict.correct)
            parse_fail.append(not verdict.parsed)
            fmt.append(format_reward(prob, t))
            refl.append(has_reflection(t))
            selfc.append(is_self_correction(t))
        c = sum(correct)
        p1.append(c / k)
        pk.append(pass_at_k(k, c, k))
        cons.append(majority_vote(answers, correct))
        rec: dict[str, Any] = {"id": prob.id, "n_correct": c, "k": k, "samples": texts}
        if greedy_out is not None:
            g_ok = judge(prob, greedy_out.texts[i])[1].correct
            gacc.append(g_ok)
            rec["greedy"] = greedy_out.texts[i]
            rec["greedy_correct"] = g_ok
        records.append(rec)
    n = max(1, len(problems))
    lens = length_stats(sampled.lengths)
    summary: dict[str, Any] = {
        "n": len(problems),
        "pass1": sum(p1) / n,
        "passk": sum(pk) / n,
        "consk": sum(cons) / n,
        "greedy_acc": (sum(gacc) / n) if greedy_out is not None else None,
        "format_rate": sum(fmt) / max(1, len(fmt)),
        "parse_fail_rate": sum(parse_fail) / max(1, len(parse_fail)),
        "mean_len": lens["mean"],
        "p90_len": lens["p90"],
        "reflection_rate": sum(refl) / max(1, len(refl)),
        "self_correction_rate": sum(selfc) / max(1, len(selfc)),
        "step_accuracy": step_accuracy(sampled.texts, reversed_digits),
        "mixing_rate": mixing_rate(sampled.texts) if sampled.texts else 0.0,
        "settings": SampleSettings(temperature, top_p, k, k).as_dict()
        | {"max_new_tokens": max_new_tokens},
    }
    return EvalResult(summary, records)


def heldout_figures(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    n: int,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    real: bool = False,
) -> dict[str, Any]:
    """``{"heldout": summary}`` of ``model`` on the task's first ``n`` held-out problems, plus
    ``"real"`` (3- and 4-number summaries on the real Countdown sample) when ``real`` and the
    task is a Countdown one. The final evaluation of sft, distill and r1."""
    with torch.no_grad():

        def ev(problems: Sequence[Problem], at: int) -> dict[str, Any]:
            return evaluate(
                model,
                tokenizer,
                problems,
                k=k,
                temperature=temperature,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                seed=at,
            ).summary

        out: dict[str, Any] = {"heldout": ev(heldout(task, n), seed)}
        if real and task.startswith("countdown"):
            rows = list(real_countdown())
            out["real"] = {
                f"{m}_numbers": ev([p for p in rows if len(p.fields["nums"]) == m], seed + 7)
                for m in (3, 4)
            }
    return out


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
