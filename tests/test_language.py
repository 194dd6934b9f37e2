"""The two-language stand-in: translation, the language-consistency reward, the mixing metric,
the bilingual corpus and the equal-token-length property."""

from __future__ import annotations

import random

import pytest

from ahamoment.language import FOREIGN_TOKENS, TO_FOREIGN, bilingual_tokens, reasoning, to_foreign
from ahamoment.metrics import is_mixed, mixing_rate
from ahamoment.models import build_tokenizer
from ahamoment.prompts import r1_zero_prompt
from ahamoment.rewards import REWARDS, language_reward
from ahamoment.stages.pretrain import PretrainConfig, make_corpus
from ahamoment.tasks import get_task
from ahamoment.tasks.base import Problem, TraceNoise

P = Problem("p", "countdown", "q", "15", {"nums": [7, 5, 13], "target": 15})


@pytest.mark.parametrize(
    "line, expected",
    [
        ("7-5=2,2+13=15|15,yes", "7－5＝2，2＋13＝15｜15，是"),
        ("wait,check:2+13=15|15,no", "等，验：2＋13＝15｜15，否"),
        ("6*4=24,24/3=8|8,yes", "6＊4＝24，24／3＝8｜8，是"),
        ("12", "12"),  # numerals are shared
    ],
)
def test_to_foreign(line, expected):
    assert to_foreign(line) == expected
    assert len(to_foreign(line)) <= len(line)


def test_every_symbol_maps_to_one_distinct_foreign_symbol():
    assert len(set(TO_FOREIGN.values())) == len(TO_FOREIGN)
    assert all(len(t) == 1 for t in FOREIGN_TOKENS)


@pytest.mark.parametrize(
    "completion, expected",
    [
        # pure target language: every counted character is ASCII
        ("<think>\n7-5=2,2+13=15|15,yes\n</think>\n<answer>7-5+13</answer>", 1.0),
        # pure second language: 4 foreign symbols, digits not counted
        ("<think>\n7－5＝2，是\n</think>\n<answer>7-5</answer>", 0.0),
        # one line each: "7-5=2,no" counts - = , no (5 chars: -,=,,,n,o); "2＋3＝5，是" counts 4 foreign
        ("<think>\n7-5=2,no\n2＋3＝5，是\n</think><answer>x</answer>", 5 / 9),
        # the answer is not part of the chain of thought
        ("<think>\n1+2=3\n</think><answer>１＋２</answer>", 1.0),
        # no tags: the reasoning is what precedes the answer
        ("1＋2=3\n<answer>1+2</answer>", 1 / 2),
        # nothing but digits and spaces, or nothing at all: nothing is mixed
        ("<think>\n12 34\n</think><answer>1</answer>", 1.0),
        ("", 1.0),
        # real Chinese counts as foreign too: 3 ASCII letters (abc) against 2 ideographs
        ("<think>abc 我们</think><answer>1</answer>", 3 / 5),
        # an unclosed think block still counts
        ("<think>\n1＋2", 0.0),
    ],
)
def test_language_reward_table(completion, expected):
    assert language_reward(P, completion) == pytest.approx(expected)
    assert REWARDS.get("language") is language_reward


def test_reasoning_extraction():
    assert reasoning("<think>a</think><answer>b</answer>") == "a"
    assert reasoning("<think>a<answer>b</answer>") == "a"
    assert reasoning("a<answer>b</answer>") == "a"
    assert reasoning("just text") == "just text"


@pytest.mark.parametrize(
    "text, mixed",
    [
        ("<think>\n7-5=2,yes\n</think><answer>7-5</answer>", False),
        ("<think>\n7-5=2,是\n</think><answer>7-5</answer>", True),  # one symbol is enough
        ("<think>\n7-5=2\n</think><answer>７－５</answer>", False),  # answer is not the CoT
        ("<think>等</think>", True),
        ("", False),
    ],
)
def test_is_mixed(text, mixed):
    assert is_mixed(text) is mixed


def test_mixing_rate_is_a_share_of_completions_not_of_characters():
    texts = ["<think>1+2=3,yes</think>", "<think>1+2=3,是</think>", "<think>a</think>", "x等"]
    assert mixing_rate(texts) == 0.5
    # one foreign symbol among many: the reward barely moves, the metric counts it fully
    long_mix = "<think>" + "1+2=3,yes\n" * 20 + "1+2=3,是</think><answer>1+2</answer>"
    assert language_reward(P, long_mix) > 0.95 and mixing_rate([long_mix]) == 1.0
    with pytest.raises(ValueError):
        mixing_rate([])


def _lines(doc: str) -> list[str]:
    return doc.split("<think>\n")[-1].split("\n</think>")[0].splitlines()


def test_corpus_mixes_lines_at_the_configured_rate():
    docs, _ = make_corpus(PretrainConfig(corpus_docs=1500, p_foreign=0.3, p_drop_tags=0.0))
    lines = [ln for d in docs for ln in _lines(d)]
    share = sum(is_mixed(ln) for ln in lines) / len(lines)
    assert 0.27 < share < 0.33, share
    mono, _ = make_corpus(PretrainConfig(corpus_docs=300))
    assert not any(is_mixed(d) for d in mono)


def test_monolingual_corpus_and_cache_key_do_not_depend_on_the_new_field():
    # p_foreign=0 draws no random numbers, so the default corpus is the one it always was
    task = get_task("countdown")
    a = [
        task.trace(task.sample(random.Random(i)), random.Random(i), TraceNoise()) for i in range(50)
    ]
    b = [
        task.trace(task.sample(random.Random(i)), random.Random(i), TraceNoise(p_foreign=0.0))
        for i in range(50)
    ]
    assert a == b
    assert PretrainConfig().cache_key() != PretrainConfig(p_foreign=0.3).cache_key()
    assert PretrainConfig(p_foreign=0.3).cache_key() != PretrainConfig(p_foreign=0.2).cache_key()


def test_a_step_costs_the_same_tokens_in_both_languages():
    cfg = PretrainConfig(corpus_docs=2000, p_foreign=0.3, p_drop_tags=0.0)
    docs, _ = make_corpus(cfg)
    tok = build_tokenizer(docs + [r1_zero_prompt("")] * 200, 512, bilingual_tokens())
    checked = 0
    for d in docs[:300]:
        for line in _lines(d):
            if is_mixed(line):
                continue
            a = tok(line, add_special_tokens=False)["input_ids"]
            b = tok(to_foreign(line), add_special_tokens=False)["input_ids"]
            assert len(a) == len(b), (line, tok.convert_ids_to_tokens(a))
            assert tok.decode(b) == to_foreign(line)
            checked += 1
    assert checked > 300
    assert tok.decode(tok("numbers nothing, no", add_special_tokens=False)["input_ids"]) == (
        "numbers nothing, no"
    )
