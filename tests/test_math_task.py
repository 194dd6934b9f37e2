"""The math task: loading, the registry, and the grader over the real GSM8K and MATH-500 files.

Benchmark checks (issue 5): each gold answer wrapped as a model output, equivalent rewrites of
it (generated per answer, only where they apply), and perturbations of it (each confirmed
non-equivalent by sympy before it counts) are graded; gold and rewrites must pass >= 99.5%,
perturbations at most 0.5%. The full MATH-500 run takes ~30 s, so it is marked ``slow``; a
1-in-10 subset runs by default. ``python tests/test_math_task.py`` prints the rates and writes
the MATH-500 misses to /tmp/math500_misses.md.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
import sympy
from math_verify import parse

from ahamoment.data import DataError
from ahamoment.rewards import accuracy_reward, judge
from ahamoment.tasks import Problem, get_task
from ahamoment.tasks.math import MATH_PROMPT_SUFFIX, MathTask, load_problem_jsonl

logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we parse here
DATA = Path(__file__).parents[1].parent / "shared" / "data"
GSM8K, MATH500 = DATA / "gsm8k_test.jsonl", DATA / "math500.jsonl"
needs_data = pytest.mark.skipif(
    not (GSM8K.exists() and MATH500.exists()),
    reason=f"benchmark files not found under {DATA} (the shared data checkout is absent)",
)
MATH = get_task("math")


# --- loading and the registry ----------------------------------------------------------------


def test_registered_and_prompt():
    assert isinstance(MATH, MathTask) and MATH.name == "math"
    assert MATH_PROMPT_SUFFIX == (
        "Please reason step by step, and put your final answer within \\boxed{}."
    )


def _write(tmp_path, rows) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_load_rows(tmp_path):
    path = _write(
        tmp_path,
        [
            {"problem": "a?", "answer": "\\frac{1}{2}"},
            {"problem": "b?", "answer": "He has 3+4=<<3+4=7>>7.\n#### 1,234", "id": "g"},
            {"problem": "c?", "answer": 12},
            {"problem": "d?", "answer": "so \\boxed{\\{1, 2\\}} holds"},
        ],
    )
    ps = MATH.load_jsonl(path)
    assert [p.answer for p in ps] == ["\\frac{1}{2}", "1234", "12", "\\{1, 2\\}"]
    assert [p.task for p in ps] == ["math"] * 4 and ps[1].id == "g" and ps[0].id == f"{path}:1"
    assert load_problem_jsonl(path)[1].answer == "1234"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"answer": "1"}, ":2: 'problem' must be a non-empty string"),
        ({"problem": "q", "answer": " "}, ":2: 'answer' must be a non-empty string or a number"),
        ({"problem": "q", "answer": True}, ":2: 'answer'"),
        ({"problem": "q"}, ":2: 'answer'"),
        ("[1]", ":2: expected a JSON object"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, [{"problem": "ok", "answer": "1"}, row])
    with pytest.raises(DataError, match=re.escape(path + message)):
        MATH.load_jsonl(path)


def test_sample_from_file(tmp_path, monkeypatch):
    import random

    path = _write(tmp_path, [{"problem": f"q{i}", "answer": str(i)} for i in range(5)])
    task = MathTask("t", path)
    drawn = {task.sample(random.Random(s)).question for s in range(50)}
    assert drawn == {f"q{i}" for i in range(5)}
    assert task.canonical(Problem("x", "t", " q1\n", "1")) == "q1"
    monkeypatch.delenv("AHAMOMENT_MATH_DATA", raising=False)
    with pytest.raises(ValueError, match="AHAMOMENT_MATH_DATA"):
        MathTask("u").sample(random.Random(0))
    monkeypatch.setenv("AHAMOMENT_MATH_DATA", path)
    assert MathTask("u").sample(random.Random(0)).task == "u"


def test_normalize_votes_by_value():
    assert MATH.normalize("so \\boxed{1,000}") == MATH.normalize("1000.0") == "1000"
    assert MATH.normalize("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"


def test_verify_from_a_thread():
    """The registered task's shared grader works outside the main thread."""
    out = []
    p = Problem("p", "math", "q", "\\dfrac{3}{4}")
    t = threading.Thread(target=lambda: out.append(MATH.verify(p, "so \\boxed{0.75}")))
    t.start()
    t.join(timeout=60)
    assert out and out[0].correct


def test_extract_tag_then_boxed():
    assert MATH.extract("<think>\\boxed{1}</think><answer> \\boxed{2} </answer>") == "\\boxed{2}"
    assert MATH.extract("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert MATH.extract("<answer></answer>") is None and MATH.extract("no answer") is None
    p = Problem("p", "math", "q", "\\frac{1}{2}")
    assert MATH.verify(p, MATH.extract("it is \\boxed{0.5}")).correct


def test_rewards_grade_tagged_math_answers():
    p = Problem("p", "math", "q", "\\frac{1}{2}")
    answer, verdict = judge(p, "<think>…</think><answer>\\boxed{0.5}</answer>")
    assert answer == "\\boxed{0.5}" and verdict.correct
    assert accuracy_reward(p, "<think>x</think> <answer>$\\dfrac12$</answer>") == 1.0
    assert accuracy_reward(p, "<think>x</think> <answer>1/3</answer>") == 0.0


# --- benchmark rewrites and perturbations ----------------------------------------------------


def _arg(s: str, i: int) -> tuple[str, int] | None:
    """A LaTeX argument at ``s[i:]`` (``{…}`` or one character) and the index after it."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] == "{") - (s[j] == "}")
        if depth == 0:
            return s[i + 1 : j], j + 1
    return None


def int_fraction(gold: str) -> tuple[int, int, int] | None:
    """``(sign, a, b)`` when ``gold`` is exactly ``±\\frac{a}{b}`` (or dfrac, ``\\frac ab``)."""
    m = re.fullmatch(r"(-?)\\[dt]?frac(.*)", gold.strip(), re.DOTALL)
    if not m:
        return None
    num = _arg(m.group(2), 0)
    den = num and _arg(m.group(2), num[1])
    if not (num and den) or m.group(2)[den[1] :].strip():
        return None
    if not (num[0].strip().isdigit() and den[0].strip().isdigit()):
        return None
    return (-1 if m.group(1) else 1), int(num[0]), int(den[0])


def terminating_decimal(q: Fraction) -> str | None:
    """``q`` as a finite decimal string, if it has one."""
    den = q.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return None
    digits = 0
    while (q * 10**digits).denominator != 1:
        digits += 1
    return f"{float(q):.{digits}f}" if digits <= 15 else None


def _top_level_split(s: str) -> list[str] | None:
    """Signed terms of a top-level sum (``x^3+3x-6`` -> ``x^3``, ``+3x``, ``-6``)."""
    terms, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth -= 1
        elif c in "+-" and depth == 0 and i > 0:
            prev = s[:i].rstrip()
            if prev and prev[-1] not in "^_=(,+-{" and not prev.endswith("\\cdot"):
                terms.append(s[start:i].strip())
                start = i
    terms.append(s[start:].strip())
    return terms if len(terms) >= 2 and all(t.lstrip("+-").strip() for t in terms) else None


def _join_terms(terms: list[str]) -> str:
    text = terms[0].lstrip("+").strip()
    for t in terms[1:]:
        text += f" {'-' if t.startswith('-') else '+'} {t.lstrip('+-').strip()}"
    return text


def _plain_number(s: str) -> bool:
    return re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s) is not None


def rewrites(gold: str) -> list[tuple[str, str]]:
    """Equivalent rewrites of ``gold`` as ``(kind, text)``, only those that apply to it."""
    g = gold.strip()
    out: list[tuple[str, str]] = [("spaces", f"  {g}  ")]
    spaced = re.sub(r"\s*([+=]|(?<=[\w}])-)\s*", r" \1 ", g)
    spaced = re.sub(r",(?!\\!)(?!\d{3}(?!\d))\s*", ", ", spaced)
    if spaced.strip() != g:
        out.append(("spaces", spaced))
    frac = int_fraction(g)
    if frac:
        sign, a, b = frac
        s = "-" if sign < 0 else ""
        out += [("dfrac", f"{s}\\dfrac{{{a}}}{{{b}}}"), ("frac", f"{s}\\frac{{{a}}}{{{b}}}")]
        out.append(("a/b", f"{s}{a}/{b}"))
        if b and (dec := terminating_decimal(Fraction(sign * a, b))):
            out.append(("decimal", dec))
    elif "\\frac" in g or "\\dfrac" in g:
        out.append(("dfrac", g.replace("\\dfrac", "\\frac").replace("\\frac", "\\dfrac")))
    if _plain_number(g) and "." in g:
        q = Fraction(g)
        out.append(
            ("frac", f"{'-' if q < 0 else ''}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}")
        )
    number = re.sub(r",\\!\s*", "", g)
    money = number.startswith("\\$")
    number = number.removeprefix("\\$")
    if re.fullmatch(r"-?\d{4,}", number):
        digits, sign = number.lstrip("-"), "-" if number.startswith("-") else ""
        groups = f"{int(digits):,}"
        pre = sign + ("\\$" if money else "")
        out += [
            ("thousands", pre + groups),
            ("thousands", pre + groups.replace(",", "\\,")),
            ("thousands", pre + groups.replace(",", "{,}")),
            ("thousands", pre + digits),
        ]
    if _plain_number(number):
        out += [("units", f"{number} \\text{{ units}}"), ("units", f"{number} dollars")]
        out.append(("x=", f"x = {number}"))
        if not money:
            out.append(
                ("units", f"\\${number}" if not number.startswith("-") else f"-\\${number[1:]}")
            )
    m = re.fullmatch(r"(.+?)\s*(\\text\{.*\}|\\mbox\{.*\}(\^\d)?|\^\\circ)", g)
    if m and _plain_number(m.group(1).strip()):
        out.append(("units", m.group(1).strip()))
        out.append(
            ("units", f"{m.group(1).strip()}\\text{{ {'degrees' if 'circ' in g else 'units'}}}")
        )
    m = re.fullmatch(r"([a-z])\s*=\s*(-?\d+)", g)
    if m:
        out.append(("x=", m.group(2)))
    if re.fullmatch(r"[-\\\w{}^ ]+", g) and not re.search(r"[a-zA-Z]", re.sub(r"\\[a-z]+", "", g)):
        if not _plain_number(number):  # numeric expressions such as 2\sqrt{5}
            out.append(("x=", f"x = {g}"))
    if "=" not in g and "," not in g and "\\pm" not in g and not g.startswith("\\begin"):
        terms = _top_level_split(g)
        if terms:
            out.append(("reordered sum", _join_terms([*terms[1:], terms[0]])))
    m = re.fullmatch(r"(.*?)\s*\\pm\s*(.*)", g)
    if m and "," not in g and "{" not in m.group(1):
        out.append(("pm as list", f"{m.group(1)} + {m.group(2)}, {m.group(1)} - {m.group(2)}"))
    thousands = re.fullmatch(r"\d{1,3}(,\d{3})+", g)
    if "," in g and not thousands and not re.search(r"[()\[\]]|\\!|\\begin|\\pm", g):
        inner = g.removeprefix("\\{").removesuffix("\\}")
        items = [x.strip() for x in inner.split(",")]
        text = ", ".join(reversed(items))
        out.append(("reordered list", f"\\{{{text}\\}}" if g.startswith("\\{") else text))
    if "\\left" in g:
        out.append(("no \\left", g.replace("\\left", "").replace("\\right", "")))
    if "pmatrix" in g:
        out.append(("bmatrix", g.replace("pmatrix", "bmatrix")))
    if "^\\circ" in g:
        out.append(("units", g.replace("^\\circ", "^{\\circ}")))
    seen = {g}
    return [(k, t) for k, t in out if not (t in seen or seen.add(t))]


def gold_value(gold: str) -> sympy.Basic | None:
    """The gold answer as sympy (via math-verify's LaTeX parser), for perturbing it."""
    found = [
        x for x in parse("\\boxed{" + gold + "}", parsing_timeout=None) if not isinstance(x, str)
    ]
    return found[0] if found else None


def differs(a: sympy.Basic, b: sympy.Basic) -> bool:
    """True when sympy shows ``a`` and ``b`` are not equal."""
    if a == b:
        return False
    if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
        d = sympy.simplify(a - b)
        if d is sympy.nan:  # oo - oo: a != b was decided above
            return False
        return bool(abs(sympy.N(d, 30)) > 1e-12) if d.is_number else d != 0
    if type(a) is not type(b):
        return True
    if isinstance(a, sympy.FiniteSet):  # some element has no equal in the other set
        return any(all(differs(x, y) for y in b) for x in a) or any(
            all(differs(y, x) for x in a) for y in b
        )
    if isinstance(a, sympy.MatrixBase):
        return a.shape != b.shape or any(differs(x, y) for x, y in zip(a, b))
    if isinstance(a, sympy.Eq):
        return differs(a.lhs, b.lhs) or differs(a.rhs, b.rhs)
    if a.args and len(a.args) == len(b.args):
        return any(
            differs(x, y) if isinstance(x, sympy.Basic) else x != y for x, y in zip(a.args, b.args)
        )
    return a != b


def _perturb_expr(v: sympy.Expr) -> Iterator[tuple[str, sympy.Expr]]:
    yield "off by one", v + 1
    if v.is_Rational and not v.is_Integer:
        yield "other fraction", sympy.Rational(v.p + 1, v.q)
        if v.p not in (0, v.q, -v.q):
            yield "other fraction", sympy.Rational(v.q, v.p)
    if not v.equals(0):
        yield "sign", -v


def perturbations(v: sympy.Basic) -> Iterator[tuple[str, sympy.Basic]]:
    """Wrong answers made from the gold value ``v`` (not yet checked for equivalence)."""
    if isinstance(v, sympy.Expr) and not isinstance(v, (sympy.Tuple,)):
        if v.free_symbols and len(v.free_symbols) == 1 and v.is_Symbol:
            return  # text answers such as \text{Evelyn}: nothing to be off by one from
        yield from _perturb_expr(v)
    elif isinstance(v, sympy.Eq):
        for kind, r in perturbations(v.rhs):
            yield kind, sympy.Eq(v.lhs, r, evaluate=False)
    elif isinstance(v, (sympy.Tuple, sympy.FiniteSet)):
        items = (
            list(v.args) if isinstance(v, sympy.Tuple) else sorted(v, key=sympy.default_sort_key)
        )
        for kind, first in _perturb_expr(items[0]):
            yield kind, type(v)(first, *items[1:])
    elif isinstance(v, sympy.MatrixBase):
        yield "off by one", v + sympy.ones(*v.shape)
        yield "sign", -v
    elif isinstance(v, sympy.Interval):
        if v.end.is_finite:
            yield "off by one", sympy.Interval(v.start, v.end + 1, v.left_open, v.right_open)
        else:
            yield "off by one", sympy.Interval(v.start - 1, v.end, v.left_open, v.right_open)


def _perturbed(gold: str) -> list[tuple[str, str]]:
    v = gold_value(gold)
    if v is None:
        return []
    return [(k, sympy.latex(p)) for k, p in perturbations(v) if differs(p, v)]


def _gsm8k_perturbed(gold: str) -> list[tuple[str, str]]:
    n = sympy.Integer(gold)
    cands = [("off by one", n + 1), ("off by one", n - 1)] + ([("sign", -n)] if n else [])
    return [(k, str(p)) for k, p in cands if differs(p, n)]


def _wrap(text: str, i: int) -> str:
    """A model output holding ``text``: tagged, or a boxed final line."""
    if i % 2:
        return f"<think>so</think>\n<answer>{text}</answer>"
    return f"... so the answer is $\\boxed{{{text}}}$."


def run_benchmark(path: Path, every: int = 1) -> dict[str, list]:
    """Grade gold, rewrites and perturbations of every ``every``-th row of ``path``."""
    is_gsm = "gsm8k" in path.name
    problems = MATH.load_jsonl(str(path))[::every]
    res: dict[str, list] = {"gold": [], "rewrite": [], "perturbed": []}
    for p in problems:
        for i in range(2):
            v = MATH.verify(p, _wrap(p.answer, i))
            res["gold"].append((p, "wrapped", p.answer, v))
        for i, (kind, text) in enumerate(rewrites(p.answer)):
            res["rewrite"].append((p, kind, text, MATH.verify(p, _wrap(text, i))))
        for i, (kind, text) in enumerate(
            _gsm8k_perturbed(p.answer) if is_gsm else _perturbed(p.answer)
        ):
            res["perturbed"].append((p, kind, text, MATH.verify(p, _wrap(text, i))))
    return res


def _rate(rows: list, correct: bool = True) -> float:
    return sum(v.correct == correct for *_, v in rows) / max(1, len(rows))


def _check(res: dict[str, list]) -> None:
    misses = [
        (k, t, p.answer, v.reason) for p, k, t, v in res["gold"] + res["rewrite"] if not v.correct
    ]
    assert _rate(res["gold"]) >= 0.995, misses[:20]
    assert _rate(res["rewrite"]) >= 0.995, misses[:20]
    false_hits = [(k, t, p.answer) for p, k, t, v in res["perturbed"] if v.correct]
    assert _rate(res["perturbed"], correct=False) >= 0.995, false_hits[:20]


@needs_data
def test_gsm8k_benchmark():
    res = run_benchmark(GSM8K)
    assert len(res["gold"]) == 2 * 1319 and len(res["perturbed"]) > 3 * 1300
    _check(res)


@needs_data
def test_math500_subset():
    res = run_benchmark(MATH500, every=10)
    assert len(res["gold"]) == 100
    _check(res)


@pytest.mark.slow
@needs_data
def test_math500_benchmark():
    _check(run_benchmark(MATH500))


def test_rewrite_generators():
    kinds = dict(rewrites("\\frac{3}{8}"))
    assert (
        kinds["a/b"] == "3/8" and kinds["decimal"] == "0.375" and kinds["dfrac"] == "\\dfrac{3}{8}"
    )
    assert "decimal" not in dict(rewrites("\\frac 13"))  # 1/3 does not terminate
    assert dict(rewrites("-\\frac9{19}"))["a/b"] == "-9/19"
    assert ("thousands", "10,080") in rewrites("10,\\!080")
    assert ("reordered sum", "3x - 6 + x^3") in rewrites("x^3+3x-6")
    assert ("x=", "5") in rewrites("x=5") and ("x=", "x = 2\\sqrt{5}") in rewrites("2\\sqrt{5}")
    assert ("units", "5.4") in rewrites("5.4 \\text{ cents}")
    assert all(k != "reordered sum" for k, _ in rewrites("(1,-2)"))
    assert ("reordered list", "7, 5, 3") in rewrites("3, 5, 7")
    assert ("pm as list", "1 + \\sqrt{19}, 1 - \\sqrt{19}") in rewrites("1 \\pm \\sqrt{19}")
    # perturbations are checked by sympy: -0 is 0, so 0 gets no sign flip
    assert [k for k, _ in _gsm8k_perturbed("0")] == ["off by one", "off by one"]
    assert ("other fraction", "\\frac{8}{3}") in _perturbed("\\frac{3}{8}")


def _report() -> None:  # pragma: no cover - run by hand: python tests/test_math_task.py
    import time
    from collections import Counter

    lines = ["# MATH-500 grading misses\n"]
    for path in (GSM8K, MATH500):
        t0 = time.perf_counter()
        res = run_benchmark(path)
        dt = time.perf_counter() - t0
        n = sum(len(v) for v in res.values())
        print(f"{path.name}: {n} gradings in {dt:.1f} s ({1e3 * dt / n:.2f} ms each)")
        for key in res:
            hits = sum(v.correct for *_, v in res[key])
            kinds = Counter(k for _, k, _, _ in res[key])
            print(f"  {key}: {hits}/{len(res[key])} = {hits / len(res[key]):.2%} graded correct")
            print(f"    kinds: {dict(kinds)}")
        if path == MATH500:
            misses = [
                f"- {p.id} [{key}: {kind}] gold `{p.answer}`, answer `{text}`: "
                + (v.reason or "graded correct")
                for key in res
                for p, kind, text, v in res[key]
                if v.correct != (key != "perturbed")
            ]
            lines.append(
                f"{len(res['gold'])} wrapped golds, {len(res['rewrite'])} rewrites, "
                f"{len(res['perturbed'])} sympy-confirmed perturbations.\n"
            )
            lines += misses or [
                "No misses: every gold and rewrite graded correct, every perturbation wrong."
            ]
            no_pert = sorted(
                {p.answer for p in MATH.load_jsonl(str(path))}
                - {p.answer for p, *_ in res["perturbed"]}
            )
            lines.append(
                f"\nGolds with no applicable perturbation ({len(no_pert)}): "
                + ", ".join(f"`{a}`" for a in no_pert)
            )
    Path("/tmp/math500_misses.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # pragma: no cover
    _report()
    sys.exit(0)
