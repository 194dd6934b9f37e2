"""Teachers for distillation: a prompt in, n samples of (reasoning, answer) out.

Two kinds share one interface, ``sample(questions, n, seed) -> list[TeacherResult]``; each
sample is a ``Completion`` whose ``reasoning`` is the chain of thought and whose ``text`` is
the final content after it:

- ``LocalTeacher``: a local HF model directory sampled with our rollout engine on the
  R1-Zero prompt; the reasoning is the text inside ``<think>…</think>``.
- ``ChatTeacher``: any OpenAI-compatible ``/chat/completions`` endpoint (DeepSeek API, vLLM,
  `aha serve`). The reasoning is read from ``message.reasoning_content`` (DeepSeek, older
  vLLM), else ``message.reasoning`` (newer vLLM renamed it), else a ``<think>`` block in
  ``content``, in that order. Requests run on ``concurrency`` threads; 429, 5xx, timeouts,
  dropped connections, truncated bodies and malformed JSON are retried with exponential
  backoff, and a prompt whose retries run out is reported as failed (never silently dropped).
"""

from __future__ import annotations

import http.client
import json
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ahamoment.evaluation import generate
from ahamoment.models import load_model, load_tokenizer
from ahamoment.prompts import r1_zero_prompt, stop_ids
from ahamoment.rewards import extract_answer
from ahamoment.rollout import Completion, FusedTorchEngine, SamplingParams

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def teacher_sample(reasoning: str | None, content: str, finish: str = "stop") -> Completion:
    """One teacher sample: its reasoning (None when the teacher gave none) and final content."""
    return Completion(ids=[], logprobs=[], finish_reason=finish, text=content, reasoning=reasoning)


@dataclass
class TeacherResult:
    """All samples for one prompt, or the error that made the prompt fail."""

    samples: list[Completion] = field(default_factory=list)
    error: str | None = None
    attempts: int = 1


def split_reasoning(message: dict[str, Any]) -> tuple[str | None, str]:
    """(reasoning, content without the think block) of one chat ``message``.

    >>> split_reasoning({"content": "<think>a</think> b"})
    ('a', 'b')
    """
    content = message.get("content") or ""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip(), content.strip()
    m = _THINK.search(content)
    if m and m.group(1).strip():
        return m.group(1).strip(), (content[: m.start()] + content[m.end() :]).strip()
    return None, content.strip()


def final_answer(content: str) -> str:
    """The answer in a teacher's final content: the last ``<answer>`` block, else the last line."""
    tagged = extract_answer(content)
    if tagged is not None:
        return tagged
    lines = [ln.strip() for ln in content.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class LocalTeacher:
    """A local model directory, sampled with our engine on the R1-Zero prompt."""

    def __init__(
        self, path: str, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128
    ) -> None:
        self.name = f"local:{path}"
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path).eval()
        self.engine = FusedTorchEngine(self.model, self.tokenizer, max_batch_rows=512)
        self.params = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids(self.tokenizer),
        )

    def sample(self, questions: Sequence[str], n: int, seed: int) -> list[TeacherResult]:
        prompts = self.tokenizer(
            [r1_zero_prompt(q) for q in questions],
            add_special_tokens=False,
            return_attention_mask=False,
        )["input_ids"]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = generate(
                self.engine,
                self.tokenizer,
                [p for p in prompts for _ in range(n)],
                self.params,
                gen,
            )
        results = []
        for i in range(len(questions)):
            samples = []
            for c in out[i * n : (i + 1) * n]:
                reasoning, content = split_reasoning({"content": c.text})
                samples.append(replace(c, text=content, reasoning=reasoning))
            results.append(TeacherResult(samples))
        return results


class RetryableError(Exception):
    """A failure worth another try (rate limit, server error, timeout, bad body)."""


class ChatTeacher:
    """An OpenAI-compatible chat endpoint, called over HTTP with retries."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        *,
        temperature: float = 0.6,
        top_p: float = 0.95,
        max_tokens: int = 4096,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        system: str = "",
    ) -> None:
        self.name = f"chat:{model}@{base_url}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.body = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.system = system

    def _request(self, question: str, n: int, seed: int) -> list[Completion]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": question}
        ]
        body = {"model": self.model, "messages": messages, "n": n, "seed": seed, **self.body}
        req = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.headers},
        )
        try:  # stdlib HTTP: one connection per request, so threads share nothing
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise RetryableError(f"HTTP {e.code}") from e
            raise ValueError(f"HTTP {e.code}: {e.read()[:200]!r}") from e
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            # hung (timeout), refused or dropped connections, truncated bodies (IncompleteRead)
            raise RetryableError(f"{type(e).__name__}: {e}") from e
        try:
            choices = sorted(json.loads(raw)["choices"], key=lambda c: c["index"])
            samples = []
            for c in choices:
                reasoning, content = split_reasoning(c["message"])
                finish = "length" if c.get("finish_reason") == "length" else "stop"
                samples.append(teacher_sample(reasoning, content, finish))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise RetryableError(f"malformed response ({type(e).__name__}: {e})") from e
        if not samples:
            raise RetryableError(f"no choices for n={n}")
        return samples[:n]

    def _with_retries(self, question: str, n: int, seed: int) -> TeacherResult:
        """n samples; a server that returns fewer choices than asked (the DeepSeek API ignores
        ``n``) is asked again for the rest. Each request gets ``max_retries`` retries."""
        rng = random.Random(seed)
        got: list[Completion] = []
        attempts = 0
        while len(got) < n:
            for retry in range(self.max_retries + 1):
                attempts += 1
                try:
                    got += self._request(question, n - len(got), seed + len(got))
                    break
                except RetryableError as e:
                    if retry == self.max_retries:
                        return TeacherResult(error=str(e), attempts=attempts)
                    delay = min(self.max_backoff, self.backoff * 2**retry)
                    time.sleep(delay * (0.5 + rng.random()))  # jitter: clients spread out
                except ValueError as e:  # 4xx other than 429: retrying will not help
                    return TeacherResult(error=str(e), attempts=attempts)
        return TeacherResult(got, attempts=attempts)

    def sample(self, questions: Sequence[str], n: int, seed: int) -> list[TeacherResult]:
        seeds = [seed * 1_000_003 + i for i in range(len(questions))]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._with_retries, questions, [n] * len(questions), seeds))
