"""Rewards, table-style: the format check, answer extraction, accuracy and batch scoring."""

import random
from pathlib import Path

import pytest

from ahamoment.rewards import REWARDS, extract_answer, judge, score
from ahamoment.tasks import get_task

CD = get_task("countdown")
P = CD.make([13, 7, 5], 15)
GOOD = "<think>\n13+7=20,20-5=15,yes\n</think>\n<answer>13+7-5</answer>"


@pytest.mark.parametrize(
    "completion, fmt",
    [
        (GOOD, 1.0),
        ("  \n" + GOOD + "\n\n", 1.0),  # surrounding whitespace is ignored
        ("<think></think><answer>13+7-5</answer>", 1.0),  # empty think, no separator
        ("<think>a\nb\nc</think>\n\n  <answer>\nx\n</answer>", 1.0),  # newlines inside
        ("<think>x</think>\n<answer>13+7-5", 0.0),  # missing close
        ("<think>x\n<answer>13+7-5</answer>", 0.0),  # think never closed
        ("<think>x</think>\n<answer>1</answer>\n<answer>2</answer>", 0.0),  # two answers
        ("<answer>13+7-5</answer>\n<think>x</think>", 0.0),  # answer before think
        ("<think>x<think>y</think></think>\n<answer>1</answer>", 0.0),  # nested think
        ("<think>x</think>\n<answer><answer>1</answer></answer>", 0.0),  # nested answer
        ("<think>x<answer>1</answer></think>\n<answer>1</answer>", 0.0),  # answer inside think
        ("<think>x</think>\n<think>y</think>\n<answer>1</answer>", 0.0),  # two thinks
        ("Sure! <think>x</think>\n<answer>1</answer>", 0.0),  # stray text before
        ("<think>x</think>\n<answer>1</answer> done", 0.0),  # stray text after
        ("<think>x</think> so <answer>1</answer>", 0.0),  # stray text between
        ("<think>x</think>\n<answer>  </answer>", 0.0),  # empty answer
        ("", 0.0),
        ("13+7=20,20-5=15,yes\n13+7-5", 0.0),  # a trace with its tags dropped
    ],
)
def test_format(completion, fmt):
    assert REWARDS.get("format")(P, completion) == fmt


@pytest.mark.parametrize(
    "completion, answer",
    [
        (GOOD, "13+7-5"),
        ("<answer> 1 </answer> then <answer>\n 2\n</answer>", "2"),  # the last one
        ("<answer>a\nb</answer>", "a\nb"),
        ("<answer>x", None),
        ("<answer></answer>", None),
        ("", None),
    ],
)
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


@pytest.mark.parametrize(
    "completion, acc, parsed",
    [
        (GOOD, 1.0, True),
        ("<think></think><answer>7-5+13=15</answer>", 1.0, True),
        ("<think></think><answer>15</answer>", 0.0, True),  # echoing the target never scores
        ("<think></think><answer>13+7-7</answer>", 0.0, True),  # number used twice
        ("<think></think><answer>13+7</answer>", 0.0, True),  # number missing
        ("<think></think><answer>13+7−5</answer>", 0.0, False),  # unicode minus
        ("<think></think><answer>2**99999</answer>", 0.0, False),
        ("13+7-5", 0.0, False),  # untagged: no answer at all
        ("", 0.0, False),
    ],
)
def test_accuracy_and_judge(completion, acc, parsed):
    assert REWARDS.get("accuracy")(P, completion) == acc
    _, verdict = judge(P, completion)
    assert (verdict.correct, verdict.parsed) == (acc == 1.0, parsed)


def test_accuracy_uses_the_problem_task():
    tz = get_task("countdown_tinyzero").make([13, 7, 5], 56)
    ar = get_task("arithmetic").sample(random.Random(0))
    assert REWARDS.get("accuracy")(tz, "<answer>(13-5)*7</answer>") == 1.0
    assert REWARDS.get("accuracy")(P, "<answer>(13-5)*7</answer>") == 0.0
    assert REWARDS.get("accuracy")(ar, f"<answer>{ar.answer}</answer>") == 1.0


def test_score_weights_components_and_flags():
    completions = [GOOD, "<think>x</think><answer>15</answer>", "no tags", ""]
    batch = score([P] * 4, completions, {"accuracy": 1.0, "format": 0.1})
    # total = 1.0 * accuracy + 0.1 * format
    assert batch.components == {"accuracy": [1.0, 0.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0, 0.0]}
    assert batch.total == pytest.approx([1.1, 0.1, 0.0, 0.0])
    assert batch.correct == [True, False, False, False]
    assert batch.parse_fail == [False, False, True, True]
    assert batch.errors == {"accuracy": 0, "format": 0}


def test_custom_reward_by_import_path_and_errors_counted(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    completions = [GOOD, "<answer>boom</answer>", "boom"]
    batch = score(
        [P] * 3,
        completions,
        {"reward_plugin:length_penalty": 1.0, "reward_plugin:broken": 2.0},
    )
    assert batch.errors == {"reward_plugin:length_penalty": 0, "reward_plugin:broken": 2}
    assert batch.components["reward_plugin:broken"] == [1.0, 0.0, 0.0]
    assert batch.total[0] == pytest.approx(2.0 - len(GOOD) / 100)
    assert batch.total[2] == pytest.approx(-4 / 100)


def test_unknown_reward_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown reward"):
        score([P], [GOOD], {"nope": 1.0})
    with pytest.raises(ValueError, match="1 problems but 2"):
        score([P], [GOOD, GOOD], {"format": 1.0})


def test_judge_uses_the_tasks_own_extractor_for_boxed_math():
    # A math completion with only \boxed{} and no <answer> tag is still graded (task.extract);
    # the memo gives the same verdict the second time.
    from ahamoment.rewards import judge
    from ahamoment.tasks.base import Problem

    p = Problem(id="m1", task="math", question="What is 1/2 + 1/4?", answer="\\frac{3}{4}")
    ans, v = judge(p, "<think>add</think> so the answer is \\boxed{0.75}.")
    assert ans == "0.75" and v.correct
    assert judge(p, "<think>add</think> so the answer is \\boxed{0.75}.")[1].correct
    assert not judge(p, "<think>add</think> \\boxed{2/3}")[1].correct
    assert judge(p, "<think>add</think> no box")[1].reason == "no answer"
