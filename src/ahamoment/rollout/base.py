"""One rollout interface: requests in, completions (ids, log-probs, finish reason) out.

Every engine takes token-id prompts, each with its own sampling settings and a sample count
``n``, and returns ``n`` completions per request, in order. An engine also streams a single
request token by token, and takes the trainer's weights after an optimizer step.

Conventions shared by all engines (the tests hold each engine to them):

- **log-probs** are those of the chosen token under ``log_softmax(logits / temperature)``,
  i.e. after temperature and *before* top-p/top-k truncation (``temperature == 0``: the raw
  logits). They are a sampler/trainer mismatch diagnostic, never old-policy log-probs.
- **stop ids** are kept at the end of the completion, with finish reason ``"stop"``. Only the
  ids in ``SamplingParams.stop_ids`` stop a row; the model's own EOS is not implied.
- **stop strings** are matched against the decoded completion (the engine's tokenizer, special
  tokens kept). Generation ends with reason ``"stop"`` at the first token whose text completes
  a stop string, and that token is kept: the stop string stays in the output, together with
  whatever else the completing token spells after it.
- otherwise a completion ends after ``max_new_tokens`` tokens with reason ``"length"``.
- **budget forcing** (``SamplingParams.budget``, see ``budget.py``) is implemented by the torch
  engine only; the others raise ``NotImplementedError`` on a request that carries one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ahamoment.registry import Registry
from ahamoment.rollout.budget import ThinkingBudget


@dataclass
class SamplingParams:
    """Sampling settings of one request. Positional order is part of the API (callers use it)."""

    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 keeps every token."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps every token."""
    max_new_tokens: int = 128
    """Completion length cap (reason ``"length"``)."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a completion; the stop id is kept."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on decoded text; needs an engine that holds a tokenizer."""
    budget: ThinkingBudget | None = None
    """Thinking budget forcing (s1): force the end of thinking, or replace an early one by
    "Wait" (``budget.py``); None: off. Torch engine only."""

    def __post_init__(self) -> None:
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    """One completion: what an engine returns and, once decoded, what every stage reads.

    The one type of a completion everywhere: rollouts, evaluations, teacher samples.
    """

    ids: list[int]
    """Token ids (empty when the source returns text only)."""
    logprobs: list[float]
    """Per-token log-probs under the sampler (see the module docstring)."""
    finish_reason: str
    """"stop" (a stop id or stop string ended it; kept) or "length"."""
    text: str | None = None
    """Decoded text: set by engines that get text back (openai), else by
    ``evaluation.decode``. A teacher sample split into reasoning and answer holds the part
    after the reasoning here."""
    reasoning: str | None = None
    """The reasoning, when a source returns it apart from ``text`` (a chat endpoint's
    ``reasoning_content``, or a teacher sample's think block)."""
    think: int | None = None
    """Tokens before ``</think>`` (all of them when thinking never ends); None: unknown."""
    version: int | None = None
    """Version of the weights that sampled it (optimizer steps taken), stamped by a server
    engine; None: sampled in this process from the current weights."""
    ref_logprobs: list[float] | None = None
    """The KL reference model's log-probs of ``ids``, when a rollout server computed them
    (``aha serve --reference``); None: the trainer computes them."""

    @property
    def length(self) -> int | None:
        """Completion tokens; None when a text-only source did not say."""
        return len(self.ids) if self.ids else (len(self.logprobs) or None)


@dataclass(frozen=True)
class Request:
    """``n`` completions of one token-id prompt under one set of sampling settings."""

    prompt: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        if not self.prompt:
            raise ValueError("a request needs a non-empty prompt")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token: ``finish_reason`` is set on the last token of a completion."""

    index: int  # which of the request's n completions
    token_id: int
    logprob: float
    finish_reason: str | None = None


@runtime_checkable
class Engine(Protocol):
    """A rollout backend. An engine class that decodes the module it is given, in this process,
    sets ``decodes_module = True``: `aha zero` then hands it a plain copy with any LoRA adapters
    merged (``lora.merged_copy``), which its ``sync_weights`` keeps current."""

    def generate(
        self, requests: Sequence[Request], generator: torch.Generator | None = None
    ) -> list[list[Completion]]:
        """``n`` completions for each request, in request order."""
        ...

    def stream(
        self, request: Request, generator: torch.Generator | None = None
    ) -> Iterator[TokenEvent]:
        """The tokens of one request as they are produced."""
        ...

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """Take the trainer's current weights (call after every optimizer step); ``version``
        (optimizer steps taken) stamps what a server engine samples with them."""
        ...


ENGINES: Registry[Any] = Registry("rollout engine")
"""Engine factories: ``ENGINES.get(name)(model, tokenizer, **options) -> Engine``."""


def per_request(flat: Sequence[Completion], requests: Sequence[Any]) -> list[list[Completion]]:
    """Completions in request order, ``n`` of them per request, as ``generate`` returns them."""
    out, i = [], 0
    for r in requests:
        out.append(list(flat[i : i + r.n]))
        i += r.n
    return out


def engine_stats(engine: Any) -> dict[str, int]:
    """An engine's fault and transfer counts since the last call (server engines), else {}."""
    take = getattr(engine, "take_stats", None)
    return take() if take is not None else {}


def resolve_pad_id(tokenizer: Any, pad_id: int | None) -> int:
    """``pad_id`` if given, else the tokenizer's pad token, else 0 (pads are never attended)."""
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else int(pad_id)


def make_engine(name: str, model: Any, tokenizer: Any = None, **options: Any) -> Engine:
    """Build a registered engine ("torch", "hf", "vllm") or one named by import path."""
    return ENGINES.get(name)(model, tokenizer, **options)


class StopStrings:
    """Decode-and-check stop strings for one completion, looking only at a recent window.

    A token spells at least one byte, and a character takes at most 4 bytes, so a stop string
    of c characters that ends in the newest token lies within its last ``4 * c`` tokens; the
    margin keeps the window's first, possibly cut, character away from the match.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        if stops and tokenizer is None:
            raise ValueError(f"stop strings {list(stops)} need a tokenizer: pass one to the engine")
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 4
        self.decode = (_rust_decode(tokenizer) if self.stops else None) or self._decode

    def __bool__(self) -> bool:
        return bool(self.stops)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def hit(self, ids: Sequence[int]) -> bool:
        if not self.stops:
            return False
        text = self.decode(list(ids[-self.window :]))
        return any(s in text for s in self.stops)

    def first_hit(self, ids: Sequence[int]) -> int | None:
        """Length of the shortest prefix of ``ids`` that contains a stop string, if any."""
        for k in range(1, len(ids) + 1):
            if self.hit(ids[:k]):
                return k
        return None


def _rust_decode(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """``tokenizer.decode(ids, skip_special_tokens=False)`` as one call into its Rust tokenizer,
    where that is exactly what transformers computes: a fast tokenizer whose ``decode`` and
    ``_decode`` are the library's own and that cleans up no spaces. Else None. Stop strings
    decode a window of every live row at every step, and the Python wrapper around the Rust
    call costs more than the decode itself."""
    try:
        from transformers import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or cls.decode is not PreTrainedTokenizerBase.decode
        or cls._decode is not TokenizersBackend._decode
        or getattr(tokenizer, "clean_up_tokenization_spaces", True) is not False
    ):
        return None
    rust = tokenizer.backend_tokenizer
    return lambda ids: rust.decode(ids, skip_special_tokens=False)


def truncate(
    ids: Sequence[int],
    logprobs: Sequence[float],
    stop_ids: Sequence[int],
    stops: StopStrings,
) -> Completion:
    """Cut a free-running completion at its first stop id or stop string (both kept)."""
    cut, reason = len(ids), "length"
    stop_set = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stop_set:
            cut, reason = i + 1, "stop"
            break
    if stops:
        k = stops.first_hit(ids[:cut])
        if k is not None:
            cut, reason = k, "stop"
    return Completion(list(ids[:cut]), list(logprobs[:cut]), reason)
