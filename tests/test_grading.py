"""The math grader: hand cases, bad gold, threads, fork, and a timeout that fires."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ahamoment.grading import Grader, as_number, final_answer, last_boxed


@pytest.fixture(scope="module")
def grader():
    g = Grader(timeout_s=5.0, workers=2)
    yield g
    g.close()


@pytest.fixture(scope="module")
def short():
    """One worker with a 0.5 s limit, for the inputs that hang."""
    g = Grader(timeout_s=0.5)
    yield g
    g.close()


OK = (True, True, "")
WRONG = (False, True, "value")


@pytest.mark.parametrize(
    "gold, answer, expected",
    [
        # fractions, dfrac, a/b, decimals
        ("\\frac{1}{2}", "\\boxed{\\frac12}", OK),
        ("\\frac{1}{2}", "\\dfrac{1}{2}", OK),
        ("\\frac{1}{2}", "1/2", OK),
        ("\\frac{1}{2}", "0.5", OK),
        ("\\frac{1}{2}", ".5", OK),
        ("\\frac{1}{2}", "\\frac{2}{4}", OK),
        ("\\frac{1}{3}", "0.333333", OK),  # math-verify rounds floats to 6 places
        ("\\frac{1}{3}", "0.333", WRONG),
        ("\\frac{14}{3}", "\\frac{3}{14}", WRONG),
        ("0.15", "\\frac{3}{20}", OK),
        ("1.25", "1.250", OK),
        ("18", "18.0", OK),
        ("18", "18.5", WRONG),
        # x = …
        ("5", "x = 5", OK),
        ("x=5", "5", OK),
        ("y = 2x + 3", "y=3+2x", OK),
        ("5", "y = 6", WRONG),
        # thousands separators
        ("1000", "1,000", OK),
        ("1000", "1\\,000", OK),
        ("1000", "1{,}000", OK),
        ("1000", "1 000", OK),
        ("10,\\!080", "10080", OK),
        ("11,\\! 111,\\! 111,\\! 100", "11\\,111\\,111\\,100", OK),
        ("1000", "1,00", WRONG),  # not a thousands grouping: the list {1, 0}
        ("12", "1,2", WRONG),
        # units, currency, percent, degrees
        ("18", "18 dollars", OK),
        ("18", "\\$18", OK),
        ("18", "18 \\text{ cm}^2", OK),
        ("5.4 \\text{ cents}", "5.4", OK),
        ("106^\\circ", "106", OK),
        ("18", "18 hundred", WRONG),  # a word that changes the value is no unit
        ("2", "2 thirds", WRONG),
        ("25", "25\\%", OK),
        ("0.25", "25%", OK),
        ("25", "26%", WRONG),
        # reordered sums, sets, tuples
        ("x^3+3x-6", "-6 + 3x + x^3", OK),
        ("p - q", "-q + p", OK),
        ("p - q", "q - p", WRONG),
        ("3, 5, 7", "7, 5, 3", OK),
        ("(6,31,-1)", "(6,-1,31)", WRONG),  # a tuple's order matters
        ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}", WRONG),  # one root of two
        # extra spaces and delimiters
        ("\\frac{14}{3}", "  \\frac { 14 } { 3 }  ", OK),
        ("(3, 4)", "( 3 ,4 )", OK),
        ("3", "$3$.", OK),
        ("3", "\\(3\\)", OK),
        ("3", "\\boxed 3", OK),
        # where the answer is taken from
        ("18", "The answer is \\boxed{17}. Wait, \\boxed{18}", OK),
        ("18", "<answer>18</answer> then <answer>19</answer>", WRONG),
        ("\\text{(C)}", "C", OK),
        ("\\text{(C)}", "\\textbf{(B)}", WRONG),
        # malformed, empty, unicode
        ("18", "", (False, False, "no answer")),
        ("18", "\\boxed{}", (False, False, "no answer")),
        ("18", "\\boxed{18", (False, False, "no answer")),  # never closed
        ("18", "\\frac{1}{", (False, False, "unparseable")),
        ("1", "a}{b", (False, False, "unparseable")),
        ("18", "eighteen", WRONG),
        ("-5", "\u22125", OK),  # unicode minus
        ("5", "\uff15", OK),  # fullwidth 5
        ("25", "5\u00b2", OK),  # 5 squared, not 52
        ("18", "18 or 19", WRONG),
        ("5", "9" * 5000, (False, False, "too long")),
        ("5", "1e999999999", WRONG),
    ],
)
def test_hand_cases(grader, gold, answer, expected):
    v = grader.grade(gold, answer)
    assert (v.correct, v.parsed, v.reason) == expected


@pytest.mark.parametrize(
    "gold",
    [
        "",
        "   ",
        "\\frac{",  # unbalanced
        "}{",
        "\\$",  # nothing math-verify can parse
        "\u00bd",  # math-verify keeps only a string: never compared as gold
    ],
)
def test_bad_gold_never_credits(grader, gold):
    for answer in (gold, f"\\boxed{{{gold}}}", f"<answer>{gold}</answer>", "1"):
        assert not grader.grade(gold, answer).correct
    assert grader.grade(gold, "1").reason == "bad gold"


def test_extraction_helpers():
    assert last_boxed("a \\boxed{\\{1, 2\\}} b \\fbox{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{x") is None and last_boxed("none") is None
    assert final_answer("<answer> $\\boxed{7}$. </answer>") == "7"
    assert final_answer("<answer>  </answer>") is None
    assert as_number("\\$1,234.50") == (as_number("1234.5")[0], False)
    assert as_number("x = 5") is None and as_number("x = 5", allow_var=True) is not None
    assert as_number("5 pi") is None and as_number("25\\%")[1]


def test_huge_exponents_time_out_within_the_limit(short):
    """9^(9^9) is a C-level big-int power: no signal could interrupt it; a kill does."""
    for answer in ("9^{9^{9}}", "(x+1)^{100000}"):
        short.grade("1", "1/1")  # a warm worker, so startup is not in the measurement
        (old,) = short._idle
        t0 = time.monotonic()
        v = short.grade("5", answer)
        elapsed = time.monotonic() - t0
        assert (v.correct, v.parsed, v.reason) == (False, False, "timeout")
        # limit 0.5 s; +0.5 s covers killing the worker and spawning its replacement
        assert 0.5 <= elapsed < 1.0, elapsed
        assert old.proc.poll() is not None  # killed, not left spinning
        (new,) = short._idle
        assert new is not old and new.proc.poll() is None
    assert short.grade("\\frac{1}{2}", "2/4").correct  # the replacement grades


def test_grading_from_threads(grader):
    """math-verify's own timeout raises outside the main thread; ours works in any thread."""
    cases = [("\\frac{1}{2}", "0.5", True), ("x^2+1", "1+x^2", True), ("18", "19", False)] * 8
    cases += [("\\sqrt{2}", "\\sqrt{3}", False), ("(1,2)", "(1, 2)", True)] * 8
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: grader.grade(c[0], c[1]).correct, cases))
    assert got == [c[2] for c in cases]
    assert grader._live <= 2  # 4 threads share the 2 workers


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_grades_with_its_own_worker(short):
    grader = short
    grader.grade("1", "1/1")  # the parent has a live worker whose pipes the child inherits
    (parent_worker,) = grader._idle
    pid = os.fork()
    if pid == 0:  # child: must not talk to the parent's worker
        code = 1
        try:
            ok = grader.grade("\\frac{1}{2}", "2/4").correct and not grader.grade("1", "2").correct
            code = 0 if ok and parent_worker not in grader._idle else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert grader._idle == [parent_worker] and grader.grade("x", "x").correct


def test_per_call_latency(grader):
    """Numbers are graded in-process; a LaTeX answer costs one round trip to the worker."""
    grader.grade("\\frac{1}{2}", "1/2")
    t0 = time.perf_counter()
    for _ in range(200):
        grader.grade("1234", "1,234")
    fast = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    for _ in range(20):
        grader.grade("\\frac{1}{2}", "\\dfrac{2}{4}")
    slow = (time.perf_counter() - t0) / 20
    # measured ~0.01 ms and ~3 ms on an idle core; generous bounds for a shared machine
    assert fast < 1e-3 and slow < 0.1, (fast, slow)
