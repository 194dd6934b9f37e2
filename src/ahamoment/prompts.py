"""The R1-Zero prompt: the template every stage renders a problem into, and its chat form.

Training, evaluation, distillation and serving all build prompts here, so a model sees the
same text wherever it is used. A task may ask for an instruction after the question
(``Task.prompt_suffix``; the math task asks for a ``\\boxed{}`` answer, as DeepSeek-R1's
evaluation does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem

THINK_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# The R1-Zero prompt (DeepSeek-R1 paper, Table 1), with the task's question in place.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>. User: {question} Assistant:"
)
_PREFIX, _SUFFIX = R1_ZERO_TEMPLATE.split("{question}")
# Jinja chat template that renders exactly R1_ZERO_TEMPLATE for one user message.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    + _PREFIX.replace("<", "{{ '<' }}")
    + "{{ m['content'] }}"
    + _SUFFIX
    + "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def r1_zero_prompt(question: str) -> str:
    """The template with ``question`` in place."""
    return R1_ZERO_TEMPLATE.format(question=question)


def prompt_text(problem: Problem) -> str:
    """The R1-Zero prompt of a problem, with its task's instruction appended if it has one."""
    question = problem.question
    suffix = getattr(get_task(problem.task), "prompt_suffix", "")
    if suffix and suffix not in question:
        question = f"{question} {suffix}"
    return r1_zero_prompt(question)


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
    """Token ids that end a completion: end-of-text, and the closing answer tag if it is one
    token."""
    ids = {tokenizer.eos_token_id}
    answer_close = tokenizer.convert_tokens_to_ids("</answer>")
    if isinstance(answer_close, int) and answer_close != tokenizer.unk_token_id:
        ids.add(answer_close)
    return tuple(i for i in ids if i is not None)


def think_end_id(tokenizer: Any) -> int | None:
    """The id of ``</think>`` when the tokenizer spells it as one token, else None."""
    end = tokenizer.convert_tokens_to_ids("</think>")
    return end if isinstance(end, int) and end != tokenizer.unk_token_id else None


def encode_prompts(tokenizer: Any, problems: Sequence[Problem]) -> list[list[int]]:
    """Token ids of each problem's prompt (no special tokens added)."""
    texts = [prompt_text(p) for p in problems]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
