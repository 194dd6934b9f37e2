"""The "openai" engine: any OpenAI-compatible ``/v1/completions`` endpoint (vLLM, SGLang, ...).

Prompts are token ids (a ``Request``, sent as a list of ints: the server must share our
tokenizer) or text (a ``TextRequest``: any server). Completions come back as text, so each
``Completion`` keeps its ``text``; its ``ids`` are empty (the completions API returns token
strings, not ids), and its ``logprobs`` are the sampled tokens' log-probs when the server
returns them (``logprobs=0``), else empty.

Differences from the in-process engines that a reader should know:

- **stop strings** are sent as ``stop``. Servers strip the matched stop string from the text;
  it is put back (our convention keeps it) when the server says which one matched (vLLM's
  ``stop_reason``, SGLang's ``matched_stop``). A server that says nothing (OpenAI itself) and a
  request with a single stop string: it is put back whenever the finish reason is "stop" and
  the text does not already end with it, which also happens when the model ended on EOS.
- **stop ids** are sent as vLLM's ``stop_token_ids`` (an extension other servers may ignore);
  the server's own EOS also ends a completion, unlike in our engines.
- **greedy** requests ask for one completion and copy it ``n`` times (vLLM rejects ``n > 1`` at
  temperature 0); **top-k** is sent as vLLM's ``top_k`` extension.
- with a ``generator``, each request carries a seed drawn from it, so a server that honours
  ``seed`` reproduces a run; draws differ from the torch engine's.
- **budget forcing**, token **streaming** and **weight sync** are not available (they need
  token-level control of a remote server): these raise ``NotImplementedError``.

Requests run concurrently (``concurrency`` threads, one HTTP request each); results keep the
request order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ahamoment.rollout.base import ENGINES, Completion, Request, SamplingParams, TokenEvent
from ahamoment.rollout.budget import reject_budget


@dataclass(frozen=True)
class TextRequest:
    """``n`` completions of one text prompt (for endpoints that do not share our tokenizer)."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a request needs a non-empty prompt")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


def completion_kwargs(params: SamplingParams, n: int, seed: int | None) -> dict[str, Any]:
    """Keyword arguments of ``client.completions.create`` for ``params`` with ``n`` samples."""
    reject_budget(params, "openai")
    greedy = params.greedy
    extra: dict[str, Any] = {}
    if params.stop_ids:
        extra["stop_token_ids"] = list(params.stop_ids)
    if params.top_k and not greedy:
        extra["top_k"] = params.top_k
    kwargs: dict[str, Any] = {
        "n": 1 if greedy else n,
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "max_tokens": params.max_new_tokens,
        "logprobs": 0,  # only the sampled token's log-prob
    }
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if seed is not None:
        kwargs["seed"] = seed
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def _matched_stop(choice: Any, stops: Sequence[str]) -> str:
    """The stop string that ended ``choice`` and that the server cut off ("" if none)."""
    if choice.finish_reason != "stop" or not stops:
        return ""
    text = choice.text or ""
    if any(text.endswith(s) for s in stops):  # the server kept it
        return ""
    extra = getattr(choice, "model_extra", None) or {}
    for key in ("stop_reason", "matched_stop"):  # vLLM, SGLang
        if key in extra:
            value = extra[key]
            return value if isinstance(value, str) and value in stops else ""
    return stops[0] if len(stops) == 1 else ""


def completion_from_choice(choice: Any, params: SamplingParams) -> Completion:
    """Our ``Completion`` from one ``choices[i]`` of a completions response."""
    text = (choice.text or "") + _matched_stop(choice, params.stop)
    lps = getattr(choice.logprobs, "token_logprobs", None) or []
    reason = "length" if choice.finish_reason == "length" else "stop"
    return Completion([], [float(x) for x in lps if x is not None], reason, text)


@ENGINES.register("openai")
class OpenAIEngine:
    """``make_engine("openai", api_model, None, base_url=...)``; ``api_model`` empty or None
    asks the server for its first listed model."""

    def __init__(
        self,
        model: str | None = None,
        tokenizer: Any = None,
        *,
        base_url: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        client: Any = None,
    ) -> None:
        if client is None:
            from openai import OpenAI

            key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=2)
        self.client = client
        self.base_url = base_url
        self.tokenizer = tokenizer
        self.concurrency = max(1, concurrency)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        models = list(self.client.models.list())
        if not models:
            raise ValueError(f"{self.base_url} lists no models; pass the model name")
        return models[0].id

    def _one(self, request: Request | TextRequest, seed: int | None) -> list[Completion]:
        p = request.params
        if p.max_new_tokens == 0:
            return [Completion([], [], "length", "") for _ in range(request.n)]
        prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
        resp = self.client.completions.create(
            model=self.model, prompt=prompt, **completion_kwargs(p, request.n, seed)
        )
        choices = sorted(resp.choices, key=lambda c: c.index)
        out = [completion_from_choice(c, p) for c in choices]
        if p.greedy:
            out = [out[0]] * request.n
        if len(out) != request.n:
            raise RuntimeError(f"{self.base_url} returned {len(out)} choices for n={request.n}")
        return out

    def generate(
        self, requests: Sequence[Request | TextRequest], generator: torch.Generator | None = None
    ) -> list[list[Completion]]:
        seeds: list[int | None] = [
            int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator else None
            for _ in requests
        ]
        for r in requests:
            reject_budget(r.params, "openai")
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests, seeds))

    def stream(
        self, request: Request | TextRequest, generator: torch.Generator | None = None
    ) -> Iterator[TokenEvent]:
        raise NotImplementedError(
            "the openai engine cannot stream token ids: the completions API returns text"
        )

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        raise NotImplementedError(
            f"{self.base_url} serves its own weights; the openai engine cannot update them"
        )
