"""Metrics: pass@k against brute force, cons@k ties, reflection and self-correction tables."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from ahamoment.metrics import (
    REFLECTION_WORDS,
    SampleSettings,
    arithmetic_steps,
    has_reflection,
    is_self_correction,
    length_stats,
    majority_vote,
    pass1,
    pass_at_k,
    reflection_rate,
    step_accuracy,
)


def _pass_at_k_brute(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            # exact rational vs float product: agreement to 1e-12 is round-off only
            assert pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_brute(n, c, k)), abs=1e-12)


def test_pass_at_k_hand_values() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-15)  # c/n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k: every pair holds a correct sample


def test_pass_at_k_large_n_is_stable() -> None:
    # C(1000, 500) overflows a float; the product form does not form it.
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001, rel=1e-12)
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, rel=1e-12)  # c=1: 1 - (1 - k/n) = k/n


def test_pass_at_k_errors() -> None:
    with pytest.raises(ValueError, match="k"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass1() -> None:
    assert pass1([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        pass1([])


@pytest.mark.parametrize(
    ("answers", "correct", "expected"),
    [
        (["5", "3", "5"], [True, False, True], True),  # clear majority "5"
        (["3", "5", "5", "3"], [False, True, True, False], False),  # 2-2 tie: "3" came first
        (["5", "3", "3", "5"], [True, False, False, True], True),  # 2-2 tie: "5" came first
        ([None, None, "4"], [False, False, True], True),  # None never votes
        ([None, "2", None, "2", "7"], [False, False, False, False, True], False),
        ([None, None], [False, False], False),  # nothing parsed
        ([], [], False),
        (["7", "7"], [True, False], True),  # flag of the FIRST sample holding the winner
    ],
)
def test_majority_vote(answers, correct, expected) -> None:
    assert majority_vote(answers, correct) is expected


def test_majority_vote_length_mismatch() -> None:
    with pytest.raises(ValueError):
        majority_vote(["1"], [True, False])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Wait, let me think.", True),
        ("WAIT", True),
        ("checking again", True),
        ("wait,check:20-5=15,no", True),
        ("check: 2+2=4", True),
        ("Let me verify this.", True),
        ("Verification step", True),
        ("double-check the sum", True),  # '-' starts a word
        ("recheck", False),  # not at a word start
        ("13+7=20,20-5=15,yes", False),
        ("<think>\n</think>", False),
        ("", False),
    ],
)
def test_has_reflection(text: str, expected: bool) -> None:
    assert has_reflection(text) is expected


def test_reflection_words_and_rate() -> None:
    assert REFLECTION_WORDS == ("wait", "check", "verif")
    assert reflection_rate(["wait", "no", "verify", "3+4=7"]) == 0.5
    with pytest.raises(ValueError):
        reflection_rate([])


SELF_CORRECTION = "<think>\n13+7=20,20-5=16,yes\nwait,check:20-5=15,no\n7-5=2,2+13=15,yes\n</think>\n<answer>7-5+13</answer>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SELF_CORRECTION, True),  # the corpus example: a check says no, a new try follows
        ("<think>\n7-5=2,2+13=15,yes\nwait,check:2+13=15,yes\n</think>", False),  # check passes
        ("wait,check:2+13=15,yes", False),
        (
            "<think>\n13+7=20,20-5=16,yes\nwait,check:20-5=15,no\n</think>\n<answer>7+13-5</answer>",
            False,
        ),
        ("13+7=20\nwait,check:20-5=15,no", False),  # rejection is the last line
        # only the answer follows (even one with '='): no new attempt inside the reasoning
        ("<think>\nwait,check:20-5=15,no\n</think>\n<answer>x=3</answer>", False),
        # another check is not another try
        ("wait,check:20-5=15,no\nwait,check:13+7=20,yes", False),
        ("20-5=16,no\n7-5=2,2+13=15,yes", False),  # rejection without a reflection word
        ("wait,check:20-5=15,correct\n7-5=2", False),  # "correct" is not a rejection
        ("Wait, that is wrong.\n7-5=2", True),
        ("Let me verify: 3*4=13? Incorrect!\n3*4=12", True),
        ("Wait, check 3*4=13, no\n\n3*4=12", True),  # blank lines in between are fine
    ],
)
def test_is_self_correction(text: str, expected: bool) -> None:
    assert is_self_correction(text) is expected


def test_length_stats() -> None:
    # 1..10: mean 5.5; linear p90 sits at index .9 * 9 = 8.1 -> 9 + .1 * (10 - 9) = 9.1
    stats = length_stats(list(range(1, 11)))
    assert stats["mean"] == 5.5
    assert stats["p90"] == pytest.approx(9.1, abs=1e-12)
    assert length_stats([]) == {"mean": 0.0, "p90": 0.0}
    assert length_stats([7]) == {"mean": 7.0, "p90": 7.0}


def test_sample_settings() -> None:
    s = SampleSettings(temperature=0.6, top_p=0.95, n=8, k=4)
    assert s.as_dict() == {"temperature": 0.6, "top_p": 0.95, "n": 8, "k": 4}
    with pytest.raises(ValueError, match="k"):
        SampleSettings(temperature=0.6, top_p=1.0, n=2, k=4)
    with pytest.raises(ValueError, match="top_p"):
        SampleSettings(temperature=0.6, top_p=0.0, n=2, k=1)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\n13+7=20,20-5=15,no\n</think>", (2, 2)),
        ("<think>\n13+7=21,21-5=16,yes\nwait,check:21-5=16,yes\n</think>", (2, 3)),
        ("<think>\n3*4=12,12-20=-8\n</think><answer>1+1=3</answer>", (2, 2)),  # answer not counted
        ("no steps here", (0, 0)),
    ],
)
def test_arithmetic_steps(text, expected):
    from ahamoment.metrics import arithmetic_steps

    assert arithmetic_steps(text) == expected


def test_step_accuracy_pools_steps():
    from ahamoment.metrics import step_accuracy

    assert step_accuracy(["<think>1+1=2</think>", "<think>2+2=5,5+1=6</think>"]) == 2 / 3
    assert step_accuracy(["nothing"]) is None


def test_step_accuracy_in_reversed_notation():
    # 58+82=140 written least-significant digit first; one wrong step (041+4=541: 140+4 != 145)
    text = "<think>\n85+28=041,041+4=441,no\n041+4=541,no\n</think>\n<answer>x</answer>"
    assert arithmetic_steps(text, reversed_digits=True) == (2, 3)
    assert arithmetic_steps(text) == (0, 3)  # read in the usual order, none is right
    assert step_accuracy([text, "<think>\n2-1=1\n</think>"], reversed_digits=True) == 0.75
