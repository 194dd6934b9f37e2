"""An OpenAI-compatible chat server over the torch sampler, with the reasoning split out.

Endpoints: ``POST /v1/chat/completions`` (plain or SSE streaming), ``POST /v1/completions``
(raw text, for ``aha eval --base-url``; token ids too, for rollouts), ``GET /v1/models``,
``GET /health``, and for a trainer ``POST /v1/weights`` / ``GET /v1/weights``.

**Rollouts for a trainer** (``aha zero --rollout-server``, ``rollout/server_engine.py``):
``/v1/completions`` takes a token-id prompt and, with ``"return_token_ids": true`` (vLLM's
extension of the same name), returns each choice's generated ``token_ids`` (a stop id kept, as
our engines do) next to its per-token ``logprobs``. Every completions response carries
``weight_version``: the version of the weights its batch was decoded with. With
``"detokenize": false`` as well (vLLM's name; no stop strings) the text is left empty and no
token is decoded, which spares the server's Python a decode per token. A request with a
``seed`` is decoded in a batch of its own under a generator seeded by it, so it reproduces
exactly what the in-process torch engine samples under the same seed. A server started with a
reference (``aha serve --reference``: a frozen copy of the weights it started with) answers
``"return_ref_logprobs": true`` with each choice's ``ref_logprobs``: that copy's log-probs of
the generated tokens at the request's temperature, the KL anchor a trainer would otherwise
compute itself. ``GET /v1/weights`` gives the copy's ``reference_sha`` (``state_sha``), so a
trainer uses them only when its own reference is bit for bit the same.

**Weight updates** (``POST /v1/weights``): the body is a safetensors file of the model's full
state dict (LoRA merged), the ``X-Weight-Version`` header its version. It is answered only
when the server has a weights key (``aha serve --weights-key``, or ``$AHA_WEIGHTS_KEY``), sent
as ``Authorization: Bearer KEY``; a server without one answers 403, so nobody can swap the
model of a server not started for training. Names, shapes and dtypes must match the served
model's exactly (400 otherwise, nothing changed). The answer comes as soon as the weights are
checked: they are copied in at once when no batch is decoding, else just before the next
batch starts (the batch being decoded finishes on the old ones), so a trainer never waits for
a rollout to end. ``GET /v1/weights`` says the version in use (0: the weights the server
started with), the one waiting if any, and the server's ``instance`` id (new at every start:
a trainer that sees it change knows the server restarted and lost its weights; completions
answers carry it as ``server_instance``).

**Reasoning split** (the DeepSeek API's ``reasoning_content``; vLLM's ``deepseek_r1`` parser
draws the same line). A completion is in its thinking from its first token until the first
``</think>``: that text is the reasoning, with ``<think>`` tags dropped. What follows is the
content, with ``<answer>``/``</answer>`` tags dropped and leading whitespace stripped. A
completion that never closes its thinking (``max_tokens`` cut it, or a stop string hit inside
it) has empty content. Our models' prompt ends with "Assistant:" and they open ``<think>``
themselves; a chat template that ends with ``<think>`` starts the completion inside the
thinking, which the rule covers as well. Tags split across tokens are held back until they
are complete (``ThinkSplitter``).

**Hidden reasoning** (``reasoning="hidden"``): the splitter drops reasoning text where it is
made, in the decoding thread, so no reasoning text ever reaches a response, a stream chunk,
an error or a log line. Usage still counts it (``completion_tokens_details.reasoning_tokens``:
the tokens up to and including the one that closes the thinking). Log-probs are returned for
content tokens only (the tokens after the closing one), in both modes. ``/v1/completions``
returns raw text, so it answers 403 in hidden mode.

**Batching**: one decoding thread (``Batcher``) takes the pending requests, waits up to
``batch_wait_ms`` for more (up to about ``max_batch_rows`` rows, each of a request's ``n``
completions being a row), and decodes them all in one ``sample_stream`` call, each row with its
own sampling settings. Every step's tokens go to per-row callbacks that detokenize, cut at
stop strings and split the reasoning; streaming and plain requests share this path (a plain
request just collects its events). A batch runs to its end: requests that arrive meanwhile
wait for the next batch (no continuous batching). At most ``max_inflight`` requests are
admitted (waiting or decoding); one more gets a 429 at once.

**Hostile clients**: every failure is an OpenAI-shaped error (``{"error": {message, type,
param, code}}``): a 4xx for a bad body (not JSON, wrong types, values out of range, an unknown
path or method), 413 for a body over ``max_request_bytes`` (read no further), 400
``context_length_exceeded`` for a prompt longer than the context (a prompt with more characters
than the context holds tokens times the longest token is refused before it is tokenized), 429
when full, and a 500 that logs only the exception's type. A client that disconnects mid-stream
leaves its rows to finish decoding (bounded by ``max_tokens``); the request is released then.

Differences from the OpenAI API: stop strings are cut from the text as OpenAI does (our
engines keep them; ``/v1/completions`` reports the cut one as vLLM's ``stop_reason``);
``seed`` decodes a request alone (see above); ``top_logprobs`` is not supported.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from starlette.exceptions import HTTPException

from ahamoment.logprobs import completion_logprobs
from ahamoment.prompts import CHAT_TEMPLATE, stop_ids
from ahamoment.rollout.base import SamplingParams
from ahamoment.rollout.sampler import sample_stream
from ahamoment.server_protocol import state_sha

log = logging.getLogger("ahamoment.serve")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_TAGS = ("<answer>", "</answer>")


# --- text: stop strings and the reasoning split ---------------------------------------------
def _partial_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some pattern."""
    best = 0
    for p in patterns:
        for k in range(min(len(p) - 1, len(text)), best, -1):
            if text.endswith(p[:k]):
                best = k
                break
    return best


class StopFilter:
    """Streams text up to (not including) the first stop string, holding back possible starts."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.buf = ""
        self.hit: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        if self.hit is not None:
            return ""
        self.buf += text
        found = [(i, s) for s in self.stops if (i := self.buf.find(s)) >= 0]
        if found:
            i, self.hit = min(found)
            out, self.buf = self.buf[:i], ""
            return out
        keep = _partial_suffix(self.buf, self.stops)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.hit is not None else self.buf), ""
        return out


class ThinkSplitter:
    """Splits streamed text into (reasoning, content) deltas; see the module docstring.

    ``keep_reasoning=False`` (hidden mode) drops reasoning text here, so it never leaves.
    """

    def __init__(self, keep_reasoning: bool = True) -> None:
        self.keep_reasoning = keep_reasoning
        self.thinking = True
        self.buf = ""
        self.started = {True: False, False: False}  # leading whitespace stripped, per part

    def _emit(self, text: str, out: list[str]) -> None:
        if not self.started[self.thinking]:
            text = text.lstrip()
            self.started[self.thinking] = bool(text)
        if self.thinking:
            if self.keep_reasoning:
                out[0] += text
        else:
            out[1] += text

    def feed(self, text: str) -> tuple[str, str]:
        out = ["", ""]
        self.buf += text
        while True:
            tags = (THINK_OPEN, THINK_CLOSE) if self.thinking else ANSWER_TAGS
            found = [(i, t) for t in tags if (i := self.buf.find(t)) >= 0]
            if not found:
                break
            i, tag = min(found)
            self._emit(self.buf[:i], out)
            self.buf = self.buf[i + len(tag) :]
            if tag == THINK_CLOSE:
                self.thinking = False
        keep = _partial_suffix(self.buf, tags)
        self._emit(self.buf[: len(self.buf) - keep], out)
        self.buf = self.buf[len(self.buf) - keep :]
        return out[0], out[1]

    def flush(self) -> tuple[str, str]:
        out = ["", ""]
        self._emit(self.buf, out)  # an unfinished tag at the very end is plain text
        self.buf = ""
        return out[0], out[1]


def split_reasoning(text: str, keep_reasoning: bool = True) -> tuple[str, str]:
    """(reasoning, content) of a whole completion text."""
    s = ThinkSplitter(keep_reasoning)
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return r1 + r2, c1 + c2


# --- requests and the decoding thread ---------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status)
        kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


@dataclass
class Job:
    """One request: ``n`` rows decoded together; events go to an asyncio queue."""

    prompt: list[int]
    params: SamplingParams
    n: int
    split: bool  # chat: split the reasoning; completions: raw text
    logprobs: bool
    loop: asyncio.AbstractEventLoop
    on_done: Any  # called on the event loop once every row has finished (or failed)
    seed: int | None = None  # decoded in a batch of its own under this seed
    detokenize: bool = True  # False: token ids and log-probs only, no text (rollouts)
    ref: bool = False  # also the reference model's log-probs of each completion
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    running: int = 0  # rows not finished yet; touched only by the decoding thread
    version: int = 0  # weight version its batch was decoded with (set by the decoding thread)

    def __post_init__(self) -> None:
        self.running = self.n

    def put(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def row_done(self, failed: bool = False) -> None:
        if self.running > 0:
            self.running = 0 if failed else self.running - 1
            if self.running == 0:
                self.loop.call_soon_threadsafe(self.on_done)


class Row:
    """One completion: token ids -> text deltas -> stop cut -> reasoning split -> events.

    Events: ("delta", index, reasoning, content, logprob entries) and
    ("finish", index, finish_reason, completion_tokens, reasoning_tokens, matched_stop, ids,
    reference log-probs or None, log-prob entries of an undetokenized row).
    """

    def __init__(self, job: Job, index: int, service: Service) -> None:
        self.job, self.index, self.service = job, index, service
        self.ids: list[int] = []
        self.visible: list[int] = []  # ids whose text is shown (not EOS/BOS/pad)
        self.sent = ""  # raw text detokenized so far
        self.closed_at: int | None = None  # tokens up to and including the closing tag
        self.stop = StopFilter(job.params.stop)
        self.split = ThinkSplitter(service.reasoning == "visible") if job.split else None
        self.done: tuple | None = None  # a finish held back for the reference log-probs
        self.lps: list[float] = []  # log-probs of a row that is not detokenized

    def token(self, token_id: int, logprob: float, finish: str | None) -> None:
        tok = self.service.tokenizer
        self.ids.append(token_id)
        if not self.job.detokenize:  # ids and log-probs only: no per-token decoding, and one
            self.lps.append(logprob)  # event per row instead of one per token
            if finish is not None:
                self._finish(finish, 0, None)
            return
        delta = ""
        if token_id not in self.service.hidden_ids:
            self.visible.append(token_id)
            text = tok.decode(self.visible, skip_special_tokens=False)
            if finish is not None or not text.endswith("\ufffd"):  # wait for a whole character
                delta, prev, self.sent = text[len(self.sent) :], len(self.sent), text
                delta = self._inject(delta, prev, text)
        if self.closed_at is None and THINK_CLOSE in self.sent:
            self.closed_at = len(self.ids)
        entries = []
        content_token = self.closed_at is not None and len(self.ids) > self.closed_at
        if self.job.logprobs and (content_token or not self.split):
            entries.append(_logprob_entry(tok.decode([token_id]), logprob))
        text = self.stop.feed(delta)
        if finish is not None:
            text += self.stop.flush()
        reasoning, content = self.split.feed(text) if self.split else ("", text)
        if finish is not None and self.split:
            r, c = self.split.flush()
            reasoning, content = reasoning + r, content + c
        if reasoning or content or entries:
            self.job.put(("delta", self.index, reasoning, content, entries))
        if finish is not None:
            n_reason = len(self.ids) if self.closed_at is None else self.closed_at
            self._finish(finish, n_reason if self.split else 0, self.stop.hit)

    def _finish(self, finish: str, n_reason: int, hit: str | None, ref=None) -> None:
        """The row's last event; a row that wants reference log-probs waits for them."""
        if self.job.ref and ref is None:
            self.done = (finish, n_reason, hit)  # the batch computes them once it has ended
            return
        self.job.row_done()  # first: the request is released before its client hears back
        entries = [_logprob_entry("", x) for x in self.lps] if self.job.logprobs else []
        event = ("finish", self.index, finish, len(self.ids), n_reason, hit, self.ids, ref, entries)
        self.job.put(event)

    def _inject(self, delta: str, prev: int, text: str) -> str:
        """Test hook: the service's ``inject_reasoning`` text at the start of the thinking and
        just before its closing tag, so leak tests have a known string inside every reasoning."""
        canary = self.service.inject_reasoning
        if not canary:
            return delta
        if prev == 0:
            delta = canary + delta
        close = text.find(THINK_CLOSE)
        if self.closed_at is None and close >= prev:
            at = close - prev + (len(canary) if prev == 0 else 0)
            delta = delta[:at] + canary + delta[at:]
        return delta


def _logprob_entry(token: str, logprob: float) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [],
    }


class Batcher:
    """The decoding thread: collects pending jobs for a few ms and decodes them in one batch."""

    def __init__(self, service: Service, max_batch_rows: int, batch_wait_ms: float) -> None:
        self.service = service
        self.max_batch_rows = max_batch_rows
        self.wait = batch_wait_ms / 1000
        self.pending: queue.Queue[Job] = queue.Queue()
        self.seeded: list[Job] = []  # seeded jobs met while filling a batch: decoded next
        self.batch_rows: list[int] = []  # rows of each decoded batch (tests, stats)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aha-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = [self.pending.get(timeout=0.05)]
            except queue.Empty:
                continue
            rows, deadline = jobs[0].n, time.monotonic() + self.wait
            while rows < self.max_batch_rows and jobs[0].seed is None:
                try:
                    job = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job.seed is not None:  # decoded alone, after this batch
                    self.seeded.append(job)
                    continue
                jobs.append(job)
                rows += job.n
            self._run(jobs)
            while self.seeded:
                self._run([self.seeded.pop(0)])

    def _run(self, jobs: list[Job]) -> None:
        svc = self.service
        rows = [Row(job, i, svc) for job in jobs for i in range(job.n)]
        self.batch_rows.append(len(rows))
        seed = jobs[0].seed if len(jobs) == 1 else None
        gen = svc.generator
        if seed is not None:
            gen = torch.Generator(device=gen.device).manual_seed(seed)
        try:
            with svc.weights_lock:  # weights change only between batches
                svc.apply_pending()
                for job in jobs:
                    job.version = svc.weight_version
                for step in sample_stream(
                    svc.model,
                    [r.job.prompt for r in rows],
                    [r.job.params for r in rows],
                    gen,
                    svc.pad_id,
                    svc.tokenizer,
                    svc.compile,
                ):
                    for t in step:
                        rows[t.row].token(t.token_id, t.logprob, t.finish_reason)
            waiting = [r for r in rows if r.done is not None]
            if waiting:  # outside the lock: the reference never changes
                svc.reference_logprobs(waiting)
        except Exception as e:  # noqa: BLE001 - every waiting request must hear of it
            # the exception text may quote generated text: name its type only
            log.error("generation failed (%s); %d requests get a 500", type(e).__name__, len(jobs))
            for job in jobs:
                job.row_done(failed=True)
                job.put(("error", "generation failed"))


class Service:
    """The model, tokenizer, limits and batcher behind the HTTP app."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "ahamoment",
        reasoning: str = "visible",
        api_key: str = "",
        max_tokens: int = 256,
        max_n: int = 8,
        max_inflight: int = 64,
        max_batch_rows: int = 64,
        batch_wait_ms: float = 5.0,
        seed: int = 0,
        max_request_bytes: int = 8 << 20,
        weights_key: str = "",
        max_weight_bytes: int = 16 << 30,
        compile: bool = True,
        reference: bool = False,
    ) -> None:
        if reasoning not in ("visible", "hidden"):
            raise ValueError(f"reasoning must be 'visible' or 'hidden', got {reasoning!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHAT_TEMPLATE
        self.name = name
        self.reasoning = reasoning
        self.api_key = api_key.encode()
        self.max_tokens, self.max_n, self.max_inflight = max_tokens, max_n, max_inflight
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.max_request_bytes = max_request_bytes
        # no token spells more characters than this: a longer text cannot fit the context
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.stop_ids = stop_ids(tokenizer)
        specials = (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
        self.hidden_ids = {i for i in specials if i is not None}
        self.pad_id = tokenizer.pad_token_id or 0
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.inflight = 0  # admitted requests; touched only on the event loop
        self.inject_reasoning = ""  # test hook: see Row._inject
        self.compile = compile  # the fused decoding step (rollout/compiled.py); False: eager
        self.weights_key = weights_key.encode()
        self.max_weight_bytes = max_weight_bytes
        self.weight_version = 0  # 0: the weights loaded at start; then as the trainer says
        self.weights_lock = threading.Lock()  # held by the decoding thread during a batch
        self.pending: tuple[dict[str, torch.Tensor], int] | None = None  # taken at next batch
        self.instance = uuid.uuid4().hex  # new at every start
        # a frozen copy of the starting weights: the KL reference of a trainer (--reference)
        self.reference = copy.deepcopy(self.model).requires_grad_(False) if reference else None
        self.reference_sha = state_sha(self.reference) if reference else None
        self.batcher = Batcher(self, max_batch_rows, batch_wait_ms)

    # -- admission and auth --
    def check_auth(self, header: str | None) -> None:
        if not self.api_key:
            return
        scheme, _, token = (header or "").partition(" ")
        ok = hmac.compare_digest(token.strip().encode(), self.api_key)
        if scheme.lower() != "bearer" or not ok:
            raise APIError(
                401,
                "missing or invalid API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key",
            )

    def check_weights_auth(self, header: str | None) -> None:
        if not self.weights_key:
            raise APIError(
                403,
                "weight updates are off: start the server with --weights-key (or "
                "$AHA_WEIGHTS_KEY) to let a trainer push weights",
                code="weight_updates_off",
            )
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.weights_key
        ):
            raise APIError(401, "missing or invalid weights key", code="invalid_api_key")

    def load_weights(self, blob: bytes, version: int) -> bool:
        """Check a full state dict (safetensors bytes; 400 on a mismatch) and put it in place
        now if no batch is decoding, else before the next one. True if it is in place now."""
        try:
            state = load_safetensors(blob)
        except (SafetensorError, ValueError, OSError):
            raise APIError(
                400, "the body is not a safetensors file", code="invalid_weights"
            ) from None
        own = self.model.state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise APIError(
                400,
                f"state dict names differ from the served model's: missing {missing[:3]}, "
                f"unexpected {extra[:3]}",
                code="invalid_weights",
            )
        for name, t in state.items():
            if t.shape != own[name].shape or t.dtype != own[name].dtype:
                raise APIError(
                    400,
                    f"{name}: got {t.dtype} {tuple(t.shape)}, the served model has "
                    f"{own[name].dtype} {tuple(own[name].shape)}",
                    code="invalid_weights",
                )
        self.pending = (state, version)  # a newer push replaces one not yet taken
        if not self.weights_lock.acquire(blocking=False):
            return False  # the decoding thread takes it before its next batch
        try:
            self.apply_pending()
        finally:
            self.weights_lock.release()
        return True

    def reference_logprobs(self, rows: list[Row]) -> None:
        """Finish ``rows`` with the reference model's log-probs of their tokens (one packed
        forward per temperature), as a trainer's KL anchor would compute them."""
        if self.reference is None:  # asked of a server started without --reference
            for r in rows:
                r._finish(*r.done, ref=[])
            return
        by_temp: dict[float, list[Row]] = {}
        for r in rows:
            by_temp.setdefault(r.job.params.temperature or 1.0, []).append(r)
        for temp, group in by_temp.items():
            lp, _, _ = completion_logprobs(
                self.reference,
                [r.job.prompt for r in group],
                [r.ids for r in group],
                temp,
                self.pad_id,
            )  # (b, Lc)
            for r, row_lp in zip(group, lp.tolist()):
                r._finish(*r.done, ref=row_lp[: len(r.ids)])

    def apply_pending(self) -> None:
        """Copy waiting weights into the model (call with ``weights_lock`` held)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        state, version = pending
        own = self.model.state_dict()
        with torch.no_grad():
            for name, t in state.items():
                own[name].copy_(t)
        self.weight_version = version

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        n: int,
        split: bool,
        logprobs: bool,
        seed: int | None = None,
        detokenize: bool = True,
        ref: bool = False,
    ) -> Job:
        """Admit a request (429 when ``max_inflight`` are in flight) and queue it; it stays
        admitted until the decoding thread has finished all its rows."""
        if self.inflight >= self.max_inflight:
            raise APIError(
                429,
                f"server busy: {self.max_inflight} requests in flight; retry",
                code="overloaded",
            )
        self.inflight += 1
        loop = asyncio.get_running_loop()
        job = Job(prompt, params, n, split, logprobs, loop, self._release, seed, detokenize, ref)
        self.batcher.pending.put(job)
        return job

    def _release(self) -> None:
        self.inflight -= 1

    # -- request parsing --
    def sampling(self, body: dict[str, Any], prompt_len: int) -> tuple[SamplingParams, int]:
        """SamplingParams and n from a request body; 4xx on anything out of range."""
        if body.get("model") != self.name:
            raise APIError(
                404,
                f"model {body.get('model')!r} is not served here; "
                f"GET /v1/models lists {self.name!r}",
                "model",
                "model_not_found",
            )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        room = self.context - prompt_len
        if max_tokens is None:
            max_tokens = max(1, min(self.max_tokens, room))
        max_tokens = _number(max_tokens, "max_tokens", int, 1, self.max_tokens)
        if max_tokens > room:
            raise APIError(
                400,
                f"this model's context length is {self.context} tokens; the "
                f"prompt has {prompt_len} and max_tokens asks for {max_tokens} more",
                "messages",
                "context_length_exceeded",
            )
        n = _number(body.get("n", 1), "n", int, 1, self.max_n)
        temperature = _number(body.get("temperature", 1.0), "temperature", float, 0.0, 2.0)
        top_p = _number(body.get("top_p", 1.0), "top_p", float, 1e-9, 1.0)
        top_k = _number(body.get("top_k", 0), "top_k", int, 0, 1 << 30)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stop, list)
            or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise APIError(400, "stop must be a non-empty string or a list of up to 4", "stop")
        if body.get("top_logprobs"):
            raise APIError(400, "top_logprobs is not supported", "top_logprobs")
        params = SamplingParams(temperature, top_p, top_k, max_tokens, self.stop_ids, tuple(stop))
        return params, n

    def chat_prompt(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise APIError(
                    400, "each message needs a role: system, user or assistant", "messages"
                )
            content = m.get("content") or ""
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = [p.get("text", "") for p in content if isinstance(p, dict)]
                content = "".join(parts) if all(isinstance(t, str) for t in parts) else None
            if not isinstance(content, str):
                raise APIError(400, "message content must be a string or text parts", "messages")
            clean.append({"role": m["role"], "content": content})
        text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        return self.tokenize(text, "messages")

    def tokenize(self, text: str, param: str) -> list[int]:
        """Token ids of ``text``; a text too long for the context is refused untokenized."""
        if len(text) > self.context * self.max_token_chars:
            raise APIError(
                400,
                f"this model's context length is {self.context} tokens; the prompt has "
                f"{len(text)} characters, more than that many tokens can hold",
                param,
                "context_length_exceeded",
            )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _number(value: Any, name: str, kind: type, lo: float, hi: float) -> Any:
    ok_type = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok_type = ok_type and float(value).is_integer()
    if not ok_type or not lo <= value <= hi:
        raise APIError(
            400,
            f"{name} must be a{'n integer' if kind is int else ' number'} "
            f"in [{lo:g}, {hi:g}], got {value!r}",
            name,
        )
    return kind(value)


def _token_id(value: Any, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


# --- the HTTP app ---------------------------------------------------------------------------
def make_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        service.batcher.close()

    app = FastAPI(title="ahamoment", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        # the exception text may quote generated or hidden text: name its type only
        log.error("%s %s failed (%s): 500", request.method, request.url.path, type(e).__name__)
        err = APIError(500, "internal error; see the server log", code="server_error")
        return JSONResponse(err.body(), status_code=500)

    async def body_of(request: Request) -> dict[str, Any]:
        service.check_auth(request.headers.get("authorization"))
        limit = service.max_request_bytes
        too_big = APIError(413, f"the request body is over {limit} bytes", code="too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        raw = bytearray()
        async for part in request.stream():  # read no further than the limit
            raw += part
            if len(raw) > limit:
                raise too_big
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.check_auth(request.headers.get("authorization"))
        card = {"id": service.name, "object": "model", "created": 0, "owned_by": "ahamoment"}
        return {"object": "list", "data": [card | {"max_model_len": service.context}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        prompt = service.chat_prompt(body)
        params, n = service.sampling(body, len(prompt))
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", "stream_options")
        usage_in_stream = bool(options.get("include_usage"))
        job = service.submit(prompt, params, n, True, bool(body.get("logprobs")))
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": service.name,
        }
        if stream:
            return StreamingResponse(
                _chat_stream(service, job, head, len(prompt), usage_in_stream),
                media_type="text/event-stream",
            )
        choices, usage = await _collect(job, len(prompt))
        out = []
        for i, c in enumerate(choices):
            message = {"role": "assistant", "content": c["content"]}
            if service.reasoning == "visible":
                message["reasoning_content"] = c["reasoning"]
            logprobs = {"content": c["logprobs"]} if job.logprobs else None
            out.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": c["finish_reason"],
                }
            )
        return head | {"object": "chat.completion", "choices": out, "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        if service.reasoning == "hidden":
            raise APIError(
                403,
                "/v1/completions returns raw text, reasoning included; it is "
                "off while the server hides reasoning: use /v1/chat/completions",
                code="reasoning_hidden",
            )
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            prompt = service.tokenize(prompt, "prompt")
        elif not (
            isinstance(prompt, list)
            and prompt
            and all(_token_id(t, len(service.tokenizer)) for t in prompt)
        ):
            raise APIError(400, "prompt must be a non-empty string or list of token ids", "prompt")
        if body.get("stream"):
            raise APIError(400, "streaming is served on /v1/chat/completions only", "stream")
        params, n = service.sampling(body, len(prompt))
        extra = body.get("stop_token_ids")
        if extra:
            if not isinstance(extra, list) or not all(
                _token_id(t, len(service.tokenizer)) for t in extra
            ):
                raise APIError(400, "stop_token_ids must be a list of token ids", "stop_token_ids")
            params.stop_ids = tuple(sorted(set(params.stop_ids) | set(extra)))
        seed = body.get("seed")
        if seed is not None:
            seed = _number(seed, "seed", int, 0, 2**63 - 1)
        token_ids = bool(body.get("return_token_ids", False))
        # vLLM's `detokenize: false`: ids and log-probs only (needs no stop strings)
        detok = not (body.get("detokenize") is False and token_ids and not params.stop)
        logprobs = body.get("logprobs") is not None
        ref = bool(body.get("return_ref_logprobs")) and service.reference is not None
        job = service.submit(prompt, params, n, False, logprobs, seed, detok, ref)
        choices, usage = await _collect(job, len(prompt))
        out = []
        for i, c in enumerate(choices):
            extra = {"token_ids": c["ids"]} if token_ids else {}
            if c["ref"] is not None:
                extra["ref_logprobs"] = c["ref"]
            lp = None
            if job.logprobs:
                lp = {
                    "tokens": [e["token"] for e in c["logprobs"]],
                    "token_logprobs": [e["logprob"] for e in c["logprobs"]],
                    "top_logprobs": None,
                    "text_offset": [],
                }
            out.append(
                {
                    "index": i,
                    "text": c["content"],
                    "logprobs": lp,
                    "finish_reason": c["finish_reason"],
                    "stop_reason": c["stop"],
                }
                | extra
            )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": service.name,
            "choices": out,
            "usage": usage,
            "weight_version": job.version,
            "server_instance": service.instance,
        }

    @app.get("/v1/weights")
    async def weights_version(request: Request) -> dict[str, Any]:
        service.check_auth(request.headers.get("authorization"))
        pending = service.pending
        return {
            "weight_version": service.weight_version,
            "pending_version": pending[1] if pending else None,
            "instance": service.instance,
            "reference_sha": service.reference_sha,
        }

    @app.post("/v1/weights")
    async def update_weights(request: Request) -> dict[str, Any]:
        service.check_weights_auth(request.headers.get("authorization"))
        try:
            version = int(request.headers.get("x-weight-version", ""))
        except ValueError:
            raise APIError(
                400, "send the weights' version as the X-Weight-Version header", "version"
            ) from None
        limit = service.max_weight_bytes
        too_big = APIError(413, f"the weights are over {limit} bytes", code="too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise too_big
        # reading and checking the tensors takes a moment: off the event loop
        now = await asyncio.to_thread(service.load_weights, bytes(raw), version)
        return {"weight_version": version, "applied": now, "instance": service.instance}

    return app


def _usage(prompt_len: int, tokens: int, reasoning: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": tokens,
        "total_tokens": prompt_len + tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


async def _collect(job: Job, prompt_len: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All events of a plain request, gathered per choice."""
    choices = [
        {
            "reasoning": "",
            "content": "",
            "logprobs": [],
            "finish_reason": None,
            "stop": None,
            "ids": [],
            "ref": None,
        }
        for _ in range(job.n)
    ]
    done = tokens = reasoning = 0
    while done < job.n:
        ev = await job.events.get()
        if ev[0] == "error":
            raise APIError(500, "generation failed; see the server log", code="server_error")
        c = choices[ev[1]]
        if ev[0] == "delta":
            c["reasoning"] += ev[2]
            c["content"] += ev[3]
            c["logprobs"] += ev[4]
        else:
            c["finish_reason"], c["stop"], c["ids"], c["ref"] = ev[2], ev[5], ev[6], ev[7]
            c["logprobs"] += ev[8]
            tokens, reasoning, done = tokens + ev[3], reasoning + ev[4], done + 1
    return choices, _usage(prompt_len, tokens, reasoning)


async def _chat_stream(
    service: Service, job: Job, head: dict[str, Any], prompt_len: int, with_usage: bool
) -> AsyncIterator[str]:
    """SSE in OpenAI's chunk format; ``data: [DONE]`` ends it."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body = head | {"object": "chat.completion.chunk", "choices": choices}
        if with_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    for i in range(job.n):
        yield chunk(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    done = tokens = reasoning = 0
    while done < job.n:
        ev = await job.events.get()
        if ev[0] == "error":
            err = APIError(500, "generation failed; see the server log", code="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            break
        if ev[0] == "delta":
            delta = {}
            if ev[2] and service.reasoning == "visible":
                delta["reasoning_content"] = ev[2]
            if ev[3]:
                delta["content"] = ev[3]
            lp = {"content": ev[4]} if job.logprobs and ev[4] else None
            if delta or lp:
                yield chunk(
                    [{"index": ev[1], "delta": delta, "logprobs": lp, "finish_reason": None}]
                )
        else:
            tokens, reasoning, done = tokens + ev[3], reasoning + ev[4], done + 1
            yield chunk([{"index": ev[1], "delta": {}, "logprobs": None, "finish_reason": ev[2]}])
    else:
        if with_usage:
            yield chunk([], _usage(prompt_len, tokens, reasoning))
    yield "data: [DONE]\n\n"
