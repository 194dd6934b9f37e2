"""Budget forcing (s1, Muennighoff et al. 2025): set how long a model thinks at test time.

- **Maximum** (``max_think``): once a completion holds ``max_think`` thinking tokens and the
  model has not closed its reasoning, the next tokens are forced to ``</think>\\n<answer>``
  (``force_ids``) and the model then writes its answer. The ``</think>`` token lands at exactly
  position ``max_think`` of the completion.
- **Minimum** (``min_think``): while fewer than ``min_think`` tokens have been written, an end
  of thinking (the ``</think>`` token, or any stop id of the request) is replaced by the
  tokens of ``Wait`` (``wait_ids``), and thinking goes on. A ``Wait`` still being written when
  the maximum is reached gives way to the forced end.

Thinking tokens are counted from the start of the completion. The R1-Zero prompt ends with
"Assistant:" (``models.r1_zero_prompt``), so the model's own opening ``<think>`` is the first.

Differences from s1: s1 forces the end-of-thinking delimiter plus "Final Answer:"; here the
answer opens with ``<answer>``, which our format and verifiers expect. s1 suppresses only the
end-of-thinking delimiter; here a stop id (EOS, ``</answer>``) before the minimum is also
replaced, since a model that stops without closing its reasoning ends its thinking too.

Engines: only the torch sampler (``rollout/sampler.py``) implements it, as per-row state in its
decoding loop. The hf, vllm and openai engines raise ``NotImplementedError`` on a request that
carries a budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

THINK_END = "</think>"
FORCE_TEXT = "</think>\n<answer>"
WAIT_TEXT = "Wait"


@dataclass(frozen=True)
class ThinkingBudget:
    """The forcing settings of one request, as token ids of one tokenizer."""

    end_id: int
    """The ``</think>`` token."""
    force_ids: tuple[int, ...]
    """Forced at the maximum: ``</think>\\n<answer>``; starts with ``end_id``."""
    wait_ids: tuple[int, ...]
    """Written in place of an early end of thinking: ``Wait``."""
    max_think: int | None = None
    """Thinking tokens allowed before ``</think>`` is forced; None: no maximum."""
    min_think: int = 0
    """Thinking tokens required before an end of thinking is let through; 0: no minimum."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "force_ids", tuple(int(t) for t in self.force_ids))
        object.__setattr__(self, "wait_ids", tuple(int(t) for t in self.wait_ids))
        if self.max_think is not None and self.max_think < 0:
            raise ValueError(f"max_think must be >= 0, got {self.max_think}")
        if self.min_think < 0:
            raise ValueError(f"min_think must be >= 0, got {self.min_think}")
        if self.max_think is not None and self.min_think > self.max_think:
            raise ValueError(
                f"min_think ({self.min_think}) must not exceed max_think ({self.max_think})"
            )
        if not self.force_ids or self.force_ids[0] != self.end_id:
            raise ValueError("force_ids must start with the end-of-thinking token")
        if not self.wait_ids or self.end_id in self.wait_ids:
            raise ValueError(
                "wait_ids must be non-empty and must not hold the end-of-thinking token"
            )

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        max_think: int | None = None,
        min_think: int = 0,
        wait: str = WAIT_TEXT,
        force: str = FORCE_TEXT,
    ) -> ThinkingBudget:
        """Token ids of ``</think>``, ``force`` and ``wait`` under ``tokenizer``.

        ``</think>`` must be a single token (it is in the embedded tokenizer and in the R1
        distills'); ``wait`` and ``force`` must survive an encode/decode round trip, since a
        BPE vocabulary without some character drops it silently.
        """
        end = _encode(tokenizer, THINK_END)
        if len(end) != 1:
            raise ValueError(
                f"budget forcing needs {THINK_END!r} to be one token; this tokenizer spells it "
                f"as {len(end)} tokens {end}"
            )
        if not force.startswith(THINK_END):
            raise ValueError(f"the forced text must start with {THINK_END!r}, got {force!r}")
        return cls(
            end_id=end[0],
            force_ids=tuple(_encode(tokenizer, force)),
            wait_ids=tuple(_encode(tokenizer, wait)),
            max_think=max_think,
            min_think=min_think,
        )


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    back = tokenizer.decode(ids, skip_special_tokens=False)
    if back != text:
        raise ValueError(
            f"the tokenizer cannot spell {text!r} (it round-trips to {back!r}); "
            "choose a text made of characters in its vocabulary"
        )
    return ids


class BudgetState:
    """One completion's forcing state: ``next(tok)`` is the token to emit in place of ``tok``."""

    def __init__(self, budget: ThinkingBudget, stop_ids: Sequence[int] = ()) -> None:
        self.budget = budget
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.count = 0  # tokens emitted so far
        self.thinking = True  # no </think> emitted yet
        self.queue: list[int] = []  # forced tokens still to emit

    def next(self, tok: int) -> int:
        b = self.budget
        if self.thinking and b.max_think is not None and self.count >= b.max_think:
            tok, self.queue = b.force_ids[0], list(b.force_ids[1:])
        elif self.queue:
            tok = self.queue.pop(0)
        elif (
            self.thinking and self.count < b.min_think and (tok == b.end_id or tok in self.stop_ids)
        ):
            tok, self.queue = b.wait_ids[0], list(b.wait_ids[1:])
        if tok == b.end_id:
            self.thinking = False
        self.count += 1
        return tok


def reject_budget(params: Any, engine: str) -> None:
    """Raise for an engine that cannot force budgets when a request asks for it."""
    if getattr(params, "budget", None) is not None:
        raise NotImplementedError(
            f"budget forcing is implemented in the torch engine only, not in {engine!r}; "
            "use --engine torch (a local model)"
        )
