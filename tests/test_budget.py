"""Budget forcing (s1): a rigged tiny model shows exactly where tokens are forced.

The rig: the tiny model's output layer gets a bias of +100 on one token, so that token is the
argmax at every step whatever the input (the logits of the untrained model are O(1)). Greedy
decoding then writes that token forever, unless the budget forcing steps in.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ahamoment.rollout import HFEngine, Request, SamplingParams, TorchEngine, sample
from ahamoment.rollout.budget import BudgetState, ThinkingBudget

PROMPT = [10, 11, 12, 13]


def rigged(model, token: int):
    """A copy of ``model`` whose argmax is always ``token`` (untied head with a bias)."""
    m = copy.deepcopy(model)
    emb = m.model.embed_tokens.weight
    head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(emb)
        head.bias.zero_()
        head.bias[token] = 100.0
    m.lm_head = head
    return m.eval()


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    enc = lambda s: tiny_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    [x] = enc("x")
    return {
        "end": enc("</think>")[0],
        "force": enc("</think>\n<answer>"),
        "wait": enc("Wait"),
        "x": x,
    }


def test_budget_ids_from_the_tokenizer(tiny_tokenizer, ids):
    b = ThinkingBudget.from_tokenizer(tiny_tokenizer, max_think=8, min_think=2)
    assert b.end_id == ids["end"] and list(b.force_ids) == ids["force"]
    assert list(b.wait_ids) == ids["wait"] and len(b.wait_ids) == 4  # W, a, i, t in this vocab
    with pytest.raises(ValueError, match="must not exceed"):
        ThinkingBudget.from_tokenizer(tiny_tokenizer, max_think=4, min_think=5)


class CharTokenizer:
    """Characters of ``alphabet`` as ids 1..; other characters are dropped, as a BPE
    vocabulary without byte fallback does. ``</think>`` is one token only if ``tags``."""

    def __init__(self, alphabet: str, tags: bool) -> None:
        self.alphabet, self.tags = alphabet, tags

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        if self.tags and text.startswith("</think>"):
            return {"input_ids": [0, *self(text[8:])["input_ids"]]}
        return {"input_ids": [self.alphabet.index(c) + 1 for c in text if c in self.alphabet]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join("</think>" if i == 0 else self.alphabet[i - 1] for i in ids)


def test_budget_rejects_what_a_tokenizer_cannot_spell():
    ok = CharTokenizer("Waitnswer<>/\n", tags=True)
    assert ThinkingBudget.from_tokenizer(ok).wait_ids == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="cannot spell 'Wait'"):
        ThinkingBudget.from_tokenizer(CharTokenizer("ait<>/answer\n", tags=True))  # no W
    with pytest.raises(ValueError, match="one token"):
        ThinkingBudget.from_tokenizer(CharTokenizer("Waitnswerhk<>/\n", tags=False))


def test_state_machine_by_hand():
    # end=1, force=[1, 7, 8], wait=[5, 6]; min 3, max 6; the model "wants" 1 at every step
    s = BudgetState(ThinkingBudget(1, (1, 7, 8), (5, 6), max_think=6, min_think=3))
    # pos 0: 1 too early -> 5 (queue [6]); pos 1: queued 6; pos 2: 1 still early -> 5;
    # pos 3: queued 6 (the Wait finishes although 3 >= min); pos 4: 1 allowed, thinking ends;
    # after that nothing is forced
    assert [s.next(1) for _ in range(7)] == [5, 6, 5, 6, 1, 1, 1]
    # never ending: the end is forced at position 6, then the rest of force_ids
    s = BudgetState(ThinkingBudget(1, (1, 7, 8), (5, 6), max_think=6, min_think=3))
    assert [s.next(9) for _ in range(10)] == [9] * 6 + [1, 7, 8, 9]
    # a Wait still being written gives way to the forced end at the maximum
    s = BudgetState(ThinkingBudget(1, (1, 7, 8), (5, 6), max_think=1, min_think=1))
    assert [s.next(1) for _ in range(4)] == [5, 1, 7, 8]
    # a stop id before the minimum is an early end too
    s = BudgetState(ThinkingBudget(1, (1,), (5,), min_think=2), stop_ids=(2,))
    assert [s.next(2), s.next(2), s.next(2)] == [5, 5, 2]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_max_budget_forces_end_of_thinking_exactly_at_the_budget(tiny_model, ids, temperature):
    model = rigged(tiny_model, ids["x"])  # never closes its thinking on its own
    for budget in (0, 3, 7):
        tb = ThinkingBudget(ids["end"], ids["force"], ids["wait"], max_think=budget)
        p = SamplingParams(temperature, 1.0, 0, budget + 6, budget=tb)
        [c] = sample(model, [PROMPT], p, torch.Generator().manual_seed(0))
        force = ids["force"]
        # positions 0..budget-1 think ("x"), </think> sits at index `budget`, then
        # "\n<answer>" is forced and the model continues freely ("x" again)
        assert c.ids == [ids["x"]] * budget + force + [ids["x"]] * (6 - len(force))
        assert c.ids.index(ids["end"]) == budget
        assert len(c.logprobs) == len(c.ids) and all(math.isfinite(x) for x in c.logprobs)
        assert c.finish_reason == "length"


def test_min_budget_replaces_an_early_end_of_thinking_by_wait(tiny_model, ids):
    model = rigged(tiny_model, ids["end"])  # wants to end its thinking at once, every step
    wait, end = ids["wait"], ids["end"]
    tb = ThinkingBudget(end, ids["force"], wait, min_think=8)
    [c] = sample(model, [PROMPT], SamplingParams(0.0, 1.0, 0, 12, budget=tb))
    # </think> at 0 -> Wait (4 tokens, 0..3); </think> at 4 -> Wait (4..7); at 8 it may end
    assert c.ids == wait + wait + [end] * 4
    # without the budget the model ends at once
    [free] = sample(model, [PROMPT], SamplingParams(0.0, 1.0, 0, 3))
    assert free.ids == [end] * 3


def test_forced_and_free_rows_share_a_batch(tiny_model, ids):
    model = rigged(tiny_model, ids["x"])
    tb = ThinkingBudget(ids["end"], ids["force"], ids["wait"], max_think=2)
    plain = SamplingParams(0.0, 1.0, 0, 8)
    forced = SamplingParams(0.0, 1.0, 0, 8, budget=tb)
    both = sample(model, [PROMPT, PROMPT[1:]], [forced, plain])
    assert both[0].ids == [ids["x"]] * 2 + ids["force"] + [ids["x"]] * 3
    assert both[1].ids == sample(model, [PROMPT[1:]], plain)[0].ids == [ids["x"]] * 8
    # the TorchEngine carries the budget through Request.params, in generate and stream
    engine = TorchEngine(model)
    [[c]] = engine.generate([Request(PROMPT, forced)])
    assert c.ids == both[0].ids
    assert [e.token_id for e in engine.stream(Request(PROMPT, forced))] == c.ids


def test_hf_engine_rejects_budgets_clearly(tiny_model, ids):
    tb = ThinkingBudget(ids["end"], ids["force"], ids["wait"], max_think=2)
    with pytest.raises(NotImplementedError, match="torch engine only"):
        HFEngine(tiny_model).generate([Request(PROMPT, SamplingParams(0.0, budget=tb))])
