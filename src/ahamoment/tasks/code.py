"""Code: write a Python function from a few examples; graded by running it in the sandbox.

One instance is registered, ``code``: small function-synthesis problems at four levels, two
families each at levels 3 and 4 (``FAMILIES``):

| level | families | the program |
|---|---|---|
| 1 | affine | ``return a * x + b`` with a in 1..9, b in 0..49 |
| 2 | square | ``return a * x * x + b`` (same ranges) |
| 3 | add, keep | ``return [x + a for x in xs]``; ``return [x for x in xs if x > a]`` |
| 4 | suffix, repeat | ``return s + 'xy'``; ``return s * a`` |

The question shows a few examples (``f(0) == 7, f(1) == 13 and f(2) == 19``: integers always
at 0, 1 and 2, so that differences give the constants and tell affine from square). The
program is graded only on **hidden** tests, other inputs kept in ``Problem.fields["tests"]``
and never in the prompt, so a program that hard-codes the examples scores 0. The canonical
form (dedupe) is the family, its constants and the examples' inputs: two integer problems
with the same function are one problem; held-out integer functions are never trained on.

**The answer** is the whole program inside the answer tags, one statement per line, indented
with 4 spaces, the tags on lines of their own::

    <answer>
    def f(x):
        return 6 * x + 7
    </answer>

``rewards.extract_answer`` strips the surrounding newlines; the tokenizer keeps spaces and
newlines (byte-level BPE, newlines isolated), so the program survives decoding byte for byte
(``tests/test_code_task.py``). A Markdown fence (```` ```python ````) around the program is
removed, for models that write one.

**Grading.** ``verify`` runs the program in ``ahamoment.sandbox`` against the hidden tests:
``correct`` only when every test passes, ``score`` = passed / total (the ``code`` reward),
``reason`` = the sandbox status; every status but passed and failed (timeout, crash, a forged
reply, ...) scores 0, and a syntax error counts as a parse failure. ``verify_many`` runs a
batch's distinct programs in parallel sandboxes (``sandbox.run_many``): ``rewards.score``
calls it once per batch. ``batch_stats`` counts a batch's sandbox statuses, logged every GRPO
step as ``task/<status>`` (``task/no_answer``: nothing to run), so an exploit being learned
(a rise of exited, protocol_error, bad_result, ...) shows in metrics.jsonl.

**Files** (``load_jsonl``): MBPP rows (``text``, ``code``, ``test_list``; the prompt is the
text and its tests, as in Austin et al. 2021) and HumanEval rows (``prompt``, ``test``,
``entry_point``; the prompt is the signature and docstring, the tests are the asserts of
``check``). Asserts are read with ``sandbox.parse_assert``; a test of any other form is
reported when the file is loaded and counts as failed, never as passed, so such a problem can
never score 1.

**Traces** (the pretraining corpus): a derivation, a program, sometimes a check, e.g. ::

    f(1)-f(0)=13-7=6
    f(2)-f(1)=31-13=18,differ
    so 6*x*x+7
    wait,check:f(2):6*4=24,24+7=31|31,yes

Noise (``TraceNoise``), as read by this task: ``p_give_up``, cut the derivation short (an
integer problem is taken as affine after the first difference; a list or string constant is
guessed); ``p_false_hit``, write the program off by one (a constant one too high or low, a
letter dropped); ``p_check``, check the program on an example before answering (a check is
always right; after a ``no`` the derivation is done in full); ``p_drop_tags``. The checks
plant the self-corrections RL may keep or drop. A trace's own program is graded in-process
when ``verify`` is called on it straight after ``trace`` (the corpus statistics of `aha
pretrain`: a sandbox per document would cost about 15 minutes); every other answer, and every
answer of a policy, goes through the sandbox.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ahamoment.data import DataError, read_jsonl
from ahamoment.sandbox import (
    STATUSES,
    Limits,
    NotGradable,
    Result,
    TestCase,
    parse_assert,
    run_many,
    same,
)
from ahamoment.tasks import TASKS
from ahamoment.tasks.base import Problem, Task, Template, TraceNoise, Verdict

log = logging.getLogger(__name__)

LEVELS: dict[int, tuple[str, ...]] = {
    1: ("affine",),
    2: ("square",),
    3: ("add", "keep"),
    4: ("suffix", "repeat"),
}
"""Families by level; a problem draws its level uniformly, then a family of that level."""
FAMILIES = tuple(f for fams in LEVELS.values() for f in fams)
ARG = {"affine": "x", "square": "x", "add": "xs", "keep": "xs", "suffix": "s", "repeat": "s"}
INT_EXAMPLES = (-1, 0, 1)
"""Integer examples: f(0) = b, f(1) - f(0) = a, and f(-1) == f(1) tells a square from an
affine map (a >= 1) by comparing two numbers of the prompt."""
N_HIDDEN = 4
_FENCE = re.compile(r"^```[a-zA-Z0-9_+-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)


# --- the families: the canonical program, and its value ----------------------------------------
@dataclass(frozen=True)
class _Family:
    body: Callable[[Any], str]
    """The canonical program's return expression for constants k."""
    value: Callable[[Any, Any], Any]
    """What that program returns: (k, input) -> output."""


_FAMILIES: dict[str, _Family] = {
    "affine": _Family(lambda k: f"{k[0]} * x + {k[1]}", lambda k, v: k[0] * v + k[1]),
    "square": _Family(lambda k: f"{k[0]} * x * x + {k[1]}", lambda k, v: k[0] * v * v + k[1]),
    "add": _Family(lambda k: f"[x + {k} for x in xs]", lambda k, v: [x + k for x in v]),
    "keep": _Family(lambda k: f"[x for x in xs if x > {k}]", lambda k, v: [x for x in v if x > k]),
    "suffix": _Family(lambda k: f"s + {k!r}", lambda k, v: v + k),
    "repeat": _Family(lambda k: f"s * {k}", lambda k, v: v * k),
}


def _family(name: str) -> _Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}") from None


def program(family: str, k: Any) -> str:
    """The canonical program of ``family`` with constants ``k`` (the gold answer)."""
    body = _family(family).body(k)  # an unknown family: ValueError before the ARG lookup
    return f"def f({ARG[family]}):\n    return {body}"


def apply(family: str, k: Any, v: Any) -> Any:
    """What ``program(family, k)`` returns on ``v`` (the examples and the hidden tests)."""
    return _family(family).value(k, v)


def _call(v: Any) -> str:
    return f"f({v!r})"


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


@dataclass(frozen=True)
class Spec:
    """A synthetic problem before it is rendered: the family, its constants, the inputs."""

    family: str
    k: Any
    shown: tuple[Any, ...]
    """Inputs of the examples in the question."""
    hidden: tuple[Any, ...]
    """Inputs of the hidden tests (none of them among ``shown``)."""


def _constants(family: str, rng: random.Random) -> Any:
    if family in ("affine", "square"):
        return (rng.randint(1, 9), rng.randint(0, 49))
    if family == "add":
        return rng.randint(1, 9)
    if family == "keep":
        return rng.randint(1, 7)
    if family == "suffix":
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(2))
    return rng.randint(2, 4)  # repeat


def _inputs(family: str, k: Any, rng: random.Random) -> tuple[tuple, tuple]:
    """(shown, hidden) inputs: distinct, hidden never among shown."""
    if family in ("affine", "square"):
        return INT_EXAMPLES, tuple(sorted(rng.sample(range(2, 13), N_HIDDEN)))
    if family in ("add", "keep"):
        shown: list[list[int]] = [_digits(rng, 3, 4), _digits(rng, 3, 4)]
        if family == "keep":  # a dropped and a+1 kept fix the threshold
            shown[0].insert(rng.randrange(len(shown[0]) + 1), k)
            shown[1].insert(rng.randrange(len(shown[1]) + 1), k + 1)
        hidden: list[list[int]] = []
        while len(hidden) < N_HIDDEN:
            xs = _digits(rng, 2, 5)
            if family == "keep" and len(hidden) < 2:  # off by one must fail somewhere
                xs.insert(rng.randrange(len(xs) + 1), k + len(hidden))
            if xs not in shown and xs not in hidden:
                hidden.append(xs)
        return tuple(shown), tuple(hidden)
    words: list[str] = []
    while len(words) < 1 + N_HIDDEN:
        w = _word(rng)
        if w not in words:
            words.append(w)
    if family == "suffix":  # f('') shows the suffix itself
        return ("", words[0]), tuple(words[1:])
    words.append(_word(rng))
    while words[-1] in words[:-1]:
        words[-1] = _word(rng)
    return (words[0], words[-1]), tuple(words[1:-1])


# --- traces ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Try:
    """A program a trace writes: the family, its constants as the trace has them, and a shift
    of x (the off-by-one ``(x + 1)``). Integer constants are ``(f(1), f(0), b)``: the program
    leaves the subtraction to Python, ``(13 - 7) * x + 7``."""

    family: str
    k: Any
    shift: int = 0


def _x(shift: int) -> str:
    return "x" if not shift else f"(x {'+' if shift > 0 else '-'} {abs(shift)})"


def _code(t: _Try) -> str:
    if t.family in ("affine", "square"):
        f1, f0, b = t.k
        x = _x(t.shift)
        xx = x if t.family == "affine" else f"{x} * {x}"
        return f"def f(x):\n    return ({f1} - {f0}) * {xx} + {b}"
    return program(t.family, t.k)


def _so(t: _Try) -> str:
    """The reasoning line that names the program."""
    if t.family in ("affine", "square"):
        f1, f0, b = t.k
        x = _x(t.shift).replace(" ", "")
        form = f"a*{x}+b" if t.family == "affine" else f"a*{x}*{x}+b"
        return f"so {form},b=f(0)={b},a=f(1)-f(0)={f1}-{f0}"
    op = {"add": "x+", "keep": "x>", "suffix": "s+", "repeat": "s*"}[t.family]
    return f"so {op}{t.k!r}"


def _derive(spec: Spec, full: bool = True) -> tuple[list[str], _Try]:
    """The derivation and the program it reaches; not ``full`` (an integer problem given up
    on), the map is taken as affine without comparing f(-1) and f(1)."""
    fam, ex = spec.family, [apply(spec.family, spec.k, v) for v in spec.shown]
    if fam in ("affine", "square"):
        fm1, f0, f1 = ex
        if not full:
            t = _Try("affine", (f1, f0, f0))
            return [_so(t)], t
        same_ = fm1 == f1
        t = _Try("square" if same_ else "affine", (f1, f0, f0))
        return [f"f(-1)={fm1},f(1)={f1},{'same' if same_ else 'differ'}", _so(t)], t
    x0, y0 = spec.shown[0], ex[0]
    if fam == "add":
        line = f"{y0[0]}-{x0[0]}={y0[0] - x0[0]}"
    elif fam == "keep":
        dropped = [x for x in x0 + spec.shown[1] if x <= spec.k]
        line = f"dropped:{','.join(map(str, dropped))},max={max(dropped)}"
    elif fam == "suffix":
        line = f"f('')={y0!r}"
    else:
        line = f"{x0}->{y0},times={spec.k}"
    t = _Try(fam, spec.k)
    return [line, _so(t)], t


def _give_up(spec: Spec, rng: random.Random) -> tuple[list[str], _Try]:
    """No derivation: an integer map is taken as affine, other constants are guessed."""
    if spec.family in ("affine", "square"):
        return _derive(spec, full=False)
    t = _Try(spec.family, _constants(spec.family, rng))
    return [_so(t)], t


def _slip(t: _Try, rng: random.Random) -> _Try:
    """The same program off by one: a constant one too high or low, x shifted, a letter."""
    step = rng.choice((-1, 1))
    if t.family in ("affine", "square"):
        f1, f0, b = t.k
        if rng.random() < 0.5:
            return _Try(t.family, t.k, shift=step)
        return _Try(t.family, (f1, f0, b + step if b + step >= 0 else b + 1))
    if t.family in ("add", "repeat", "keep"):
        lo = {"add": 1, "repeat": 1, "keep": 0}[t.family]
        return _Try(t.family, t.k + step if t.k + step >= lo else t.k + 1)
    k = t.k[1:] if rng.random() < 0.5 else t.k + t.k[-1]  # suffix: a letter dropped or doubled
    return _Try(t.family, k)


def _check(t: _Try, spec: Spec) -> tuple[str, bool]:
    """A 'wait,check:' line that runs the program on an example; its verdict is right."""
    run = _run(_code(t))
    if t.family in ("affine", "square"):  # at x = 0: b, or with a shift the value at +-1
        f1, f0, b = t.k
        x0 = str(t.shift)
        xx = x0 if t.family == "affine" else f"{x0}*{x0}"
        got, want = run(0), apply(spec.family, spec.k, 0)
        line = f"f(0)=({f1}-{f0})*{xx}+{b}={got}|{want}"
    elif t.family == "keep":  # the threshold must drop k and keep k+1
        got = [run(v) for v in spec.shown]
        want = [apply(spec.family, spec.k, v) for v in spec.shown]
        line = f"{spec.k}<={t.k}<{spec.k + 1}"
    else:
        x1 = spec.shown[1]
        got, want = run(x1), apply(spec.family, spec.k, x1)
        if t.family == "add":
            got, want = got[0], want[0]
            line = f"{x1[0]}+{t.k}={got}|{want}"
        else:
            op = "+" if t.family == "suffix" else "*"
            line = f"{x1}{op}{t.k}={got}|{want}"
    ok = got == want
    return f"wait,check:{line},{'yes' if ok else 'no'}", ok


def _run(code: str) -> Callable[[Any], Any]:
    """The function a trace's own program defines (trusted code: this module wrote it)."""
    ns: dict[str, Any] = {}
    exec(compile(code, "<trace>", "exec"), ns)  # noqa: S102
    return ns["f"]


def _render(lines: list[str], answer: str, drop_tags: bool) -> str:
    if drop_tags:
        return "\n".join([*lines, answer])
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>\n{answer}\n</answer>"


# --- the task -------------------------------------------------------------------------------
class CodeTask(Task):
    """Function synthesis graded by the sandbox; see the module docstring."""

    version = 1
    """Bump when problems or traces change: pretraining cache keys include it."""

    def __init__(self, name: str, timeout: float = 1.0, limits: Limits | None = None) -> None:
        self.name = name
        self.timeout = timeout
        """Wall-clock seconds of one program's whole run (start, load, every test)."""
        self.limits = limits or Limits()
        self._trusted: tuple[str, str, Verdict] | None = None  # (problem id, program, verdict)

    # --- problems ---------------------------------------------------------------------------
    def make(self, spec: Spec, id: str | None = None) -> Problem:
        """The problem of ``spec``: examples in the question, hidden tests in the fields."""
        ex = [(_call(v), apply(spec.family, spec.k, v)) for v in spec.shown]
        shown = ", ".join(f"{c} == {y!r}" for c, y in ex[:-1]) + f" and {ex[-1][0]} == "
        shown += repr(ex[-1][1])
        # the id names the hidden inputs too: two draws of one canonical problem may differ there
        hidden = hashlib.sha256(repr(spec.hidden).encode()).hexdigest()[:8]
        return Problem(
            id=id or f"{self.name}:{self._key(spec)}#{hidden}",
            task=self.name,
            question=f"Write a Python function f({ARG[spec.family]}) with {shown}.",
            answer=program(spec.family, spec.k),
            fields={
                "family": spec.family,
                "level": next(lv for lv, fams in LEVELS.items() if spec.family in fams),
                "k": spec.k,
                "examples": tuple(TestCase(c, y) for c, y in ex),
                "tests": tuple(
                    TestCase(_call(v), apply(spec.family, spec.k, v)) for v in spec.hidden
                ),
                "spec": spec,
            },
        )

    @staticmethod
    def _key(spec: Spec) -> str:
        return f"{spec.family}:{spec.k!r}:{spec.shown!r}"

    def sample(self, rng: random.Random) -> Problem:
        family = rng.choice(LEVELS[rng.choice(sorted(LEVELS))])
        k = _constants(family, rng)
        shown, hidden = _inputs(family, k, rng)
        return self.make(Spec(family, k, shown, hidden))

    def canonical(self, problem: Problem) -> str:
        spec = problem.fields.get("spec")
        if isinstance(spec, Spec):
            return self._key(spec)
        return f"file:{' '.join(problem.question.split())}"

    def load_jsonl(self, path: str) -> list[Problem]:
        """MBPP rows (text, code, test_list) or HumanEval rows (prompt, test, entry_point)."""
        out, skipped = [], 0
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            if "test_list" in row:
                p = _mbpp(row, where)
            elif {"prompt", "test", "entry_point"} <= set(row):
                p = _humaneval(row, where)
            else:
                raise DataError(
                    f"{where}: a code row has text, code and test_list (MBPP) or prompt, test "
                    f"and entry_point (HumanEval); got the fields {sorted(row)}"
                )
            p.task = self.name
            skipped += len(p.fields["not_gradable"])
            out.append(p)
        if skipped:
            log.warning(
                "%s: %d tests are not gradable by this harness (only `assert CALL == VALUE`); "
                "they count as failed",
                path,
                skipped,
            )
        return out

    # --- grading ----------------------------------------------------------------------------
    def program_of(self, problem: Problem, answer: str) -> str:
        """The program run for ``answer``: the fence removed, a file's preamble prepended (a
        HumanEval answer that only continues the prompt gets the prompt)."""
        code = answer.strip()
        m = _FENCE.match(code)
        if m:
            code = m.group(1)
        entry, prompt = problem.fields.get("entry_point"), problem.fields.get("prompt", "")
        if entry and prompt and not re.search(rf"^\s*def\s+{re.escape(entry)}\b", code, re.M):
            code = prompt + _body(code)
        preamble = problem.fields.get("preamble", "")
        return f"{preamble}\n{code}\n" if preamble else f"{code}\n"

    def verify(self, problem: Problem, answer: str) -> Verdict:
        return self.verify_many([problem], [answer])[0]

    def verify_many(self, problems: Sequence[Problem], answers: Sequence[str]) -> list[Verdict]:
        """Verdicts of many answers, their distinct programs run in parallel sandboxes."""
        out: list[Verdict | None] = [None] * len(problems)
        jobs: dict[tuple[str, str], list[int]] = {}
        for i, (p, a) in enumerate(zip(problems, answers)):
            tests = p.fields.get("tests")
            if not isinstance(answer := a, str) or not answer.strip():
                out[i] = Verdict(False, False, "no answer")
            elif not isinstance(tests, tuple) or not all(isinstance(t, TestCase) for t in tests):
                out[i] = Verdict(False, True, "bad gold")  # a gold we cannot read: no credit
            elif self._trusted is not None and self._trusted[:2] == (p.id, answer):
                out[i] = self._trusted[2]
            else:
                jobs.setdefault((p.id, self.program_of(p, answer)), []).append(i)
        keys = list(jobs)
        tests_of = {
            p.id: p.fields["tests"] for p in problems if isinstance(p.fields.get("tests"), tuple)
        }
        results = run_many(
            [(code, tests_of[pid]) for pid, code in keys], timeout=self.timeout, limits=self.limits
        )
        for key, r in zip(keys, results):
            for i in jobs[key]:
                out[i] = _verdict(r, len(problems[i].fields.get("not_gradable", ())))
        return [v for v in out if v is not None]

    def batch_stats(self, problems: Sequence[Problem], verdicts: Sequence[Verdict]) -> dict:
        """Counts of a batch's sandbox statuses (every status, zeros too) and of no answer."""
        counts = Counter(v.reason for v in verdicts)
        return {**{s: counts[s] for s in STATUSES}, "no_answer": counts["no answer"]}

    def templates(self) -> list[Template]:
        """The program that returns its argument unchanged."""
        return [
            (
                "identity",
                lambda p: (
                    f"def f({ARG.get(p.fields.get('family'), 'x')}):\n"
                    f"    return {ARG.get(p.fields.get('family'), 'x')}"
                ),
            )
        ]

    # --- traces -----------------------------------------------------------------------------
    def trace(self, problem: Problem, rng: random.Random, noise: TraceNoise) -> str:
        """A noisy derivation, program and check; grammar in the module docstring."""
        spec: Spec = problem.fields["spec"]
        if rng.random() < noise.p_give_up:
            lines, t = _give_up(spec, rng)
        else:
            lines, t = _derive(spec)
        if rng.random() < noise.p_false_hit:
            slipped = _slip(t, rng)
            if slipped != t:
                t = slipped
                lines[-1] = _so(t)
        if rng.random() < noise.p_check:
            line, ok = _check(t, spec)
            lines.append(line)
            if not ok:
                redo, t = _derive(spec)
                lines += redo
        answer = _code(t)
        self._trusted = (problem.id, answer, _trusted_verdict(answer, problem.fields["tests"]))
        return _render(lines, answer, rng.random() < noise.p_drop_tags)


def _body(code: str) -> str:
    """A function body whose first line lost its indentation (answers are stripped), indented
    as the rest of it is (4 spaces when it is one line), for appending to a prompt."""
    first, *rest = code.splitlines()
    depths = [len(ln) - len(ln.lstrip()) for ln in rest if ln.strip()]
    pad = " " * (min(depths) if depths and min(depths) > 0 else 4)
    return "\n".join([pad + first.lstrip(), *rest]) + "\n"


def _verdict(r: Result, not_gradable: int) -> Verdict:
    total = r.total + not_gradable
    score = r.passed / total if r.status in ("passed", "failed") and total else 0.0
    correct = r.status == "passed" and not_gradable == 0
    return Verdict(correct, r.status != "syntax_error", r.status, score)


def _trusted_verdict(code: str, tests: Sequence[TestCase]) -> Verdict:
    """The verdict of a program this module wrote, run in-process (trusted code only)."""
    ns: dict[str, Any] = {"f": _run(code)}
    passed = sum(same(eval(t.call, ns), t.expected) for t in tests)  # noqa: S307
    status = "passed" if passed == len(tests) else "failed"
    return Verdict(passed == len(tests), True, status, passed / len(tests))


# --- files ----------------------------------------------------------------------------------
def _cases(lines: Sequence[str], where: str) -> tuple[tuple[TestCase, ...], list[str]]:
    cases, bad = [], []
    for line in lines:
        try:
            cases.append(parse_assert(line))
        except NotGradable as e:
            bad.append(f"{where}: {e}")
    return tuple(cases), bad


def _mbpp(row: dict[str, Any], where: str) -> Problem:
    text, tests = row.get("text") or row.get("prompt"), row.get("test_list")
    if not isinstance(text, str) or not isinstance(tests, list) or not tests:
        raise DataError(f"{where}: MBPP rows need a text and a non-empty test_list")
    if not all(isinstance(t, str) for t in tests):
        raise DataError(f"{where}: test_list must hold assert lines (strings)")
    cases, bad = _cases(tests, where)
    setup = row.get("test_setup_code") or ""
    question = f"{text}\nYour code should pass these tests:\n" + "\n".join(tests)
    return Problem(
        id=str(row.get("task_id", where)),
        task="code",
        question=question,
        answer=str(row.get("code", "")),
        fields={"tests": cases, "not_gradable": bad, "preamble": setup},
    )


def _humaneval(row: dict[str, Any], where: str) -> Problem:
    prompt, test, entry = row["prompt"], row["test"], row["entry_point"]
    if not all(isinstance(x, str) and x for x in (prompt, test, entry)):
        raise DataError(f"{where}: prompt, test and entry_point must be non-empty strings")
    try:
        tree = ast.parse(test)
    except SyntaxError as e:
        raise DataError(f"{where}: the test is not Python ({e.msg})") from e
    check = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None
    )
    if check is None or not check.args.args:
        raise DataError(f"{where}: the test has no check(candidate) function")
    arg = check.args.args[0].arg
    lines, bad = [], []
    for node in check.body:
        if isinstance(node, ast.Assert):
            node = _Rename(arg, entry).visit(node)
            lines.append(ast.unparse(node))
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            bad.append(f"{where}: not an assert: {ast.unparse(node).splitlines()[0]!r}")
    cases, bad_asserts = _cases(lines, where)
    try:
        body = ast.parse(prompt).body
    except SyntaxError:
        body = []  # a prompt that is not a whole module: no preamble, the prompt is prepended
    preamble = "\n".join(ast.unparse(n) for n in body if isinstance(n, ast.Import | ast.ImportFrom))
    return Problem(
        id=str(row.get("task_id", where)),
        task="code",
        question=f"Write the Python function {entry}:\n{prompt.strip()}",
        answer=prompt + str(row.get("canonical_solution", "")),
        fields={
            "tests": cases,
            "not_gradable": bad + bad_asserts,
            "preamble": preamble,
            "entry_point": entry,
            "prompt": prompt,
        },
    )


class _Rename(ast.NodeTransformer):
    """``candidate`` -> the entry point's name, in a HumanEval assert."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.Name(self.new, node.ctx) if node.id == self.old else node


CODE = TASKS.add("code", CodeTask("code"))
