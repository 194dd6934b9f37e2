"""The "server" engine: rollouts from inference servers apart from the trainer, weights pushed.

``aha zero --rollout-server URL[,URL...]`` samples through this engine. Each server is an
``aha serve --weights-key KEY`` process (or a vLLM server, ``weight_sync="vllm"``) that holds a
copy of the policy. Each group of completions (one prompt, ``n`` samples) is one
``/v1/completions`` request with a token-id prompt; the answer carries the generated token ids
(``return_token_ids``, the stop id kept as in every engine), their log-probs under the
server's weights and the **weight version** that sampled them (``Completion.version``).
Groups are dealt round-robin over the live servers, ``concurrency`` requests at a time.

After each optimizer step the trainer calls ``sync_weights(model, version)``: the merged state
dict goes to every live server (``WEIGHT_SYNCS``: ``aha``, a safetensors body to
``POST /v1/weights``; ``vllm``, vLLM's own weight transfer), and the call returns once each has
taken it.

**Faults.** A request that cannot reach its server, or gets a 5xx, marks that server down and
goes to the next live one: a group is received whole or sent again, never half-kept. A server
whose instance id changed since it took our weights has restarted with its start-up weights;
it is marked down too and that group is sent again. Down servers are probed (``/health``) at most once a second,
and one that answers gets the current weights *before* it serves again. With no server up for
``wait_s`` seconds the engine raises. ``take_stats()`` returns and resets the counts (groups
sent again, pushes, servers up) for the trainer's metrics.

**Reference log-probs.** Given ``reference_sha`` (``server_protocol.state_sha`` of the trainer's KL
reference), the engine asks each server whose own reference has that hash (``aha serve
--reference``) for ``ref_logprobs`` too, so the trainer skips its reference forward; other
servers are asked for none, and a batch with any row lacking them is anchored by the trainer.

Versions: ``aha serve`` stamps each answer; for vLLM the stamp is the version this client last
pushed to that server before the request (the older one if a push happened meanwhile).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from ahamoment import lora
from ahamoment.registry import Registry
from ahamoment.rollout.base import (
    ENGINES,
    Completion,
    Request,
    SamplingParams,
    TokenEvent,
    per_request,
)
from ahamoment.rollout.budget import reject_budget

WEIGHT_SYNCS: Registry[Any] = Registry("weight sync")
"""How new weights reach one server: ``WEIGHT_SYNCS.get(name)(url, key) -> push(state, version)``."""

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerDown(Exception):
    """A server could not be reached or failed (5xx): the request goes to another."""


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 600.0,
) -> tuple[int, bytes]:
    """One HTTP request (no proxy): (status, body); a connection failure raises ServerDown."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        raise ServerDown(f"{url}: {e}") from None


def _error(status: int, raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@WEIGHT_SYNCS.register("aha")
class AhaPush:
    """``POST /v1/weights`` of ``aha serve``: the whole state dict as one safetensors body."""

    def __init__(self, url: str, key: str, timeout: float = 600.0) -> None:
        self.url, self.key, self.timeout = url, key, timeout

    def __call__(self, blob: bytes, version: int) -> str | None:
        """Push; returns the server's instance id."""
        headers = _bearer(self.key) | {
            "X-Weight-Version": str(version),
            "Content-Type": "application/octet-stream",
        }
        status, raw = http("POST", f"{self.url}/v1/weights", blob, headers, self.timeout)
        if status >= 500:
            raise ServerDown(f"{self.url}: weight push failed ({status})")
        if status != 200:  # a wrong key or another model: no retry can fix it
            raise ValueError(f"{self.url}/v1/weights: {status} {_error(status, raw)}")
        return json.loads(raw).get("instance")


@WEIGHT_SYNCS.register("vllm")
class VLLMPush:
    """vLLM's weight transfer (``rollout/vllm_sync.py``; written against vLLM 0.32, untested
    here: no GPU was lent)."""

    def __init__(self, url: str, key: str, timeout: float = 600.0) -> None:
        from ahamoment.rollout.vllm_sync import make_vllm_sync

        self.sync = make_vllm_sync([url], key)

    def __call__(self, blob: bytes, version: int) -> str | None:
        from safetensors.torch import load

        self.sync.push(load(blob), version)
        return None  # vLLM says no instance id


@dataclass
class _Server:
    url: str
    push: Any
    name: str = ""  # the served model id
    up: bool = True
    version: int | None = None  # the version last pushed here (None: none yet)
    instance: str | None = None  # the server process that took it (aha serve's instance id)
    ref: bool = False  # its reference is the trainer's: ask it for reference log-probs
    probed: float = 0.0


@dataclass
class _Group:
    prompt: tuple[int, ...]
    params: SamplingParams
    n: int
    seed: int | None


@ENGINES.register("server")
class ServerEngine:
    """``make_engine("server", model, tokenizer, urls=[...], weights_key=...)``; see the
    module docstring. ``model`` is not decoded here (its weights go to the servers)."""

    decodes_module = False

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        urls: Sequence[str],
        api_key: str = "",
        weights_key: str = "",
        weight_sync: str = "aha",
        concurrency: int = 32,
        max_n: int = 8,
        seeded: bool = False,
        timeout: float = 600.0,
        wait_s: float = 120.0,
        reference_sha: str | None = None,
    ) -> None:
        if not urls:
            raise ValueError("the server engine needs at least one server URL")
        push = WEIGHT_SYNCS.get(weight_sync)
        bases = [u.strip().rstrip("/").removesuffix("/v1") for u in urls if u.strip()]
        self.servers = [_Server(b, push(b, weights_key, timeout)) for b in bases]
        self.tokenizer, self.api_key = tokenizer, api_key
        self.concurrency, self.max_n, self.seeded = max(1, concurrency), max(1, max_n), seeded
        self.timeout, self.wait_s = timeout, wait_s
        self.reference_sha = reference_sha
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.blob: bytes | None = None  # the current weights, for servers that come back
        self.version: int | None = None
        self._next = 0
        for s in self.servers:  # learn each served model's id; a dead one is probed later
            try:
                self._hello(s)
            except ServerDown:
                s.up = False
        if not any(s.up for s in self.servers):  # a typo or servers not started: say so now
            urls = ", ".join(s.url for s in self.servers)
            raise ConnectionError(
                f"no rollout server answers at {urls}: start `aha serve --weights-key KEY` "
                "there first, or let `aha launch` start them"
            )

    # -- servers --------------------------------------------------------------------------
    def _hello(self, s: _Server) -> None:
        status, raw = http("GET", f"{s.url}/v1/models", None, _bearer(self.api_key), 10.0)
        if status != 200:
            if status >= 500:
                raise ServerDown(f"{s.url}: {status}")
            raise ValueError(f"{s.url}/v1/models: {status} {_error(status, raw)}")
        s.name = json.loads(raw)["data"][0]["id"]
        s.ref = False
        if self.reference_sha:  # aha serve says which reference it holds; others have none
            status, raw = http("GET", f"{s.url}/v1/weights", None, _bearer(self.api_key), 10.0)
            if status == 200:
                s.ref = json.loads(raw).get("reference_sha") == self.reference_sha

    def _revive(self, s: _Server) -> bool:
        """Probe a down server; one that answers gets the current weights, then serves."""
        s.probed = time.monotonic()
        try:
            self._hello(s)
            if self.blob is not None and self.version is not None:
                s.instance = s.push(self.blob, self.version)
                s.version = self.version
        except ServerDown:
            return False
        with self.lock:
            s.up = True
            self.stats["servers_revived"] += 1
        return True

    def _pick(self) -> _Server:
        """The next live server, round-robin; probes down ones, waits up to wait_s for one."""
        deadline = time.monotonic() + self.wait_s
        while True:
            for s in self.servers:
                if not s.up and time.monotonic() - s.probed > 1.0:
                    self._revive(s)
            with self.lock:
                live = [s for s in self.servers if s.up]
                if live:
                    self._next += 1
                    return live[self._next % len(live)]
            if time.monotonic() > deadline:
                urls = ", ".join(s.url for s in self.servers)
                raise ConnectionError(f"no rollout server answered for {self.wait_s:.0f} s: {urls}")
            time.sleep(0.2)

    def _down(self, s: _Server) -> None:
        with self.lock:
            if s.up:
                s.up, s.probed = False, time.monotonic()
                self.stats["servers_lost"] += 1

    # -- rollouts -------------------------------------------------------------------------
    def _body(self, s: _Server, g: _Group) -> dict[str, Any]:
        p = g.params
        body: dict[str, Any] = {
            "model": s.name,
            "prompt": list(g.prompt),
            "n": 1 if p.greedy else g.n,
            "temperature": 0.0 if p.greedy else p.temperature,
            "top_p": 1.0 if p.greedy else p.top_p,
            "max_tokens": p.max_new_tokens,
            "logprobs": 0,
            "return_token_ids": True,
        }
        if p.top_k and not p.greedy:
            body["top_k"] = p.top_k
        if p.stop_ids:
            body["stop_token_ids"] = list(p.stop_ids)
        if p.stop:
            body["stop"] = list(p.stop)
        else:  # the trainer decodes the ids itself: the server need not
            body["detokenize"] = False
        if g.seed is not None:
            body["seed"] = g.seed
        if s.ref:
            body["return_ref_logprobs"] = True
        return body

    def _one(self, g: _Group) -> list[Completion]:
        """One group from some server, whole; sent again elsewhere on any server fault."""
        if g.params.max_new_tokens == 0:
            return [Completion([], [], "length", version=self.version) for _ in range(g.n)]
        while True:
            s = self._pick()
            sent = s.version
            headers = _bearer(self.api_key) | {"Content-Type": "application/json"}
            try:
                status, raw = http(
                    "POST",
                    f"{s.url}/v1/completions",
                    json.dumps(self._body(s, g)).encode(),
                    headers,
                    self.timeout,
                )
                if status == 429:  # busy: same server, a moment later
                    time.sleep(0.05)
                    continue
                if status >= 500:
                    raise ServerDown(f"{s.url}: {status} {_error(status, raw)}")
                if status != 200:
                    raise ValueError(f"{s.url}/v1/completions: {status} {_error(status, raw)}")
                resp = json.loads(raw)
                stamp = resp.get("weight_version")
                if stamp is None:  # a server that does not stamp (vLLM): what we had pushed
                    stamp = sent if sent is None or s.version is None else min(sent, s.version)
                instance = resp.get("server_instance")
                if s.instance is not None and instance not in (None, s.instance):
                    raise ServerDown(f"{s.url}: restarted (serves version {stamp})")
                out = [self._completion(c, stamp) for c in sorted(resp["choices"], key=_index)]
            except ServerDown:
                self._down(s)
                with self.lock:
                    self.stats["groups_resent"] += 1
                continue
            if g.params.greedy:
                out = [out[0]] * g.n
            if len(out) != g.n:
                raise RuntimeError(f"{s.url} returned {len(out)} choices for n={g.n}")
            return out

    @staticmethod
    def _completion(choice: dict[str, Any], version: int | None) -> Completion:
        ids = choice.get("token_ids")
        if ids is None:
            raise RuntimeError("the server returned no token ids (it needs return_token_ids)")
        lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
        if len(lps) != len(ids):
            raise RuntimeError(f"{len(ids)} token ids but {len(lps)} log-probs in an answer")
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        ref = choice.get("ref_logprobs")
        if ref is not None and len(ref) != len(ids):
            ref = None  # the trainer computes them
        return Completion(
            list(ids), [float(x) for x in lps], reason, version=version, ref_logprobs=ref
        )

    def generate(
        self, requests: Sequence[Request], generator: torch.Generator | None = None
    ) -> list[list[Completion]]:
        """Consecutive requests for the same prompt and settings (a group, as ``sample_groups``
        sends them) go out as one request with ``n`` samples, at most ``max_n`` each."""
        groups: list[_Group] = []
        for r in requests:
            reject_budget(r.params, "server")
            for _ in range(r.n):
                last = groups[-1] if groups else None
                if last and last.prompt == r.prompt and last.params == r.params:
                    if last.n < self.max_n:
                        last.n += 1
                        continue
                groups.append(_Group(r.prompt, r.params, 1, None))
        if self.seeded and generator is not None:
            for g in groups:
                g.seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        with ThreadPoolExecutor(min(self.concurrency, len(groups) or 1)) as pool:
            flat = [c for out in pool.map(self._one, groups) for c in out]
        return per_request(flat, requests)

    def stream(
        self, request: Request, generator: torch.Generator | None = None
    ) -> Iterator[TokenEvent]:
        raise NotImplementedError("the server engine samples whole groups; it does not stream")

    # -- weights --------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """Push the merged weights to every live server as ``version`` (the optimizer steps
        taken; default: one more than the last). Returns once every live server has them."""
        version = (self.version or 0) + 1 if version is None else version
        state = {
            k: v.detach().to("cpu").contiguous().clone()  # tied weights: no shared storage
            for k, v in lora.merged_state_dict(model).items()
        }
        self.blob, self.version = save_safetensors(state), version
        live = [s for s in self.servers if s.up]

        def push(s: _Server) -> None:
            try:
                s.instance = s.push(self.blob, version)
                s.version = version
                with self.lock:
                    self.stats["weight_pushes"] += 1
            except ServerDown:
                self._down(s)

        with ThreadPoolExecutor(max(1, len(live))) as pool:
            list(pool.map(push, live))
        for s in self.servers:  # a server back up gets these weights before it serves
            if not s.up and time.monotonic() - s.probed > 1.0:
                self._revive(s)

    def take_stats(self) -> dict[str, int]:
        """Counts since the last call (groups sent again, servers lost and back, pushes),
        and the servers up now."""
        with self.lock:
            out = {
                k: self.stats[k]
                for k in ("groups_resent", "servers_lost", "servers_revived", "weight_pushes")
            }
            self.stats.clear()
            out["servers_up"] = sum(s.up for s in self.servers)
        return out


def _index(choice: dict[str, Any]) -> int:
    return int(choice.get("index", 0))
