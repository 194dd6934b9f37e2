"""Math answer grading: normalised numbers in-process, math-verify in a worker process.

``grade(gold, answer)`` returns a :class:`~ahamoment.tasks.base.Verdict`. The answer is the
last ``\\boxed{…}`` of ``answer`` when it has one (else all of it), without ``$…$``/``\\(…\\)``
delimiters or a final period. Then:

1. **Numbers** (GSM8K and every numeric MATH answer) are compared exactly, in this process, as
   fractions: ``1,234`` = ``1 234`` = ``1\\,234`` = ``1{,}234`` = ``1234.0``; a leading
   ``x =`` (answer only), ``$``/``\\$``, a trailing ``%`` and a unit (``\\text{ cm}^2``,
   ``^\\circ``, up to three plain words such as ``dollars``) are dropped. ``25%`` also equals
   ``0.25``. Words that change the value (``hundred``, ``halves``, ``pi``…) are not units.
2. **Everything else** goes to math-verify (``parse`` of ``\\boxed{…}``, then ``verify``) in a
   persistent worker subprocess, with math-verify's own timeouts off.

Why a subprocess: math-verify's timeout uses ``signal.alarm``, which raises in any thread but
the main one (it broke rewards in other frameworks' worker threads), and cannot interrupt a
C-level big-integer power such as ``9^{9^{9}}`` even in the main thread. Here the caller waits on
the worker's pipe with a wall-clock deadline; a worker past it is killed and replaced at once
(the replacement imports sympy in the background), and the call returns
``Verdict(False, False, "timeout")``. Worker startup is not charged to a call's timeout. Each
worker also caps its memory (``RLIMIT_AS``) and, per request, its CPU time (``RLIMIT_CPU``), so
one orphaned by a killed parent still dies. Graders are safe to share between threads (a pool of
``workers`` processes, one request each at a time) and across ``fork`` (the child starts its own
workers). POSIX only (``select`` on pipes).

A gold answer that is empty, has unbalanced braces, or that math-verify cannot turn into a
sympy object gives ``Verdict(False, …, "bad gold")``: never credit. Reasons: ``""`` (correct),
``value``, ``no answer``, ``unparseable``, ``too long``, ``bad gold``, ``timeout``,
``grader error``.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ahamoment.tasks.base import Verdict

MAX_ANSWER_CHARS = 1000
"""Longer answers (after taking the last \\boxed) are not graded: parsed=False, 'too long'."""

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# --- extracting the answer ------------------------------------------------------------------


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``start`` (``\\{`` and ``\\}`` are escaped)."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def balanced(text: str) -> bool:
    """True when every unescaped ``{`` has its ``}``."""
    depth, i = 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
        i += 1
    return depth == 0


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` or ``\\fbox{…}``; None if absent or never closed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = start + (6 if text.startswith("\\boxed", start) else 5)
    while rest < len(text) and text[rest] == " ":
        rest += 1
    if rest < len(text) and text[rest] == "{":
        end = _closing_brace(text, rest)
        return None if end is None else text[rest + 1 : end]
    token = re.match(r"[^\s$]+", text[rest:])  # "\boxed 5": a one-token argument
    return token.group(0) if token else None


def _strip_delimiters(text: str) -> str:
    text = text.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
            return _strip_delimiters(text[len(left) : len(text) - len(right)])
    return text


_SUPERSCRIPTS = str.maketrans({"\u00b2": "^{2}", "\u00b3": "^{3}", "\u2212": "-"})


def final_answer(text: str) -> str | None:
    """The answer to grade in ``text``, or None if there is none.

    ``text`` may be a tagged answer or a whole completion: the content of the last
    ``<answer>…</answer>`` is used if there is one, then the last ``\\boxed{…}`` inside it.
    """
    if not isinstance(text, str):
        return None
    tagged = _TAG.findall(text)
    if tagged:
        text = tagged[-1]
    if "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed(text)
        if boxed is None:
            return None
        text = boxed
    text = _strip_delimiters(text.translate(_SUPERSCRIPTS))
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text or None


# --- numbers --------------------------------------------------------------------------------

# Words after a number that change its value, so they are never read as a unit.
_NOT_UNITS = frozenset(
    "or and to plus minus times over divided by squared cubed square cube root sqrt pi e i "
    "log ln sin cos tan exp factorial dozen dozens hundred hundreds thousand thousands million "
    "millions billion billions trillion trillions half halves third thirds quarter quarters "
    "fourth fourths fifth fifths sixth sixths seventh sevenths eighth eighths ninth ninths "
    "tenth tenths hundredth hundredths thousandth thousandths percent percentage pct".split()
)
_UNIT_WORDS = r"[A-Za-z]{2,}(?:[ ][A-Za-z]{2,}){0,2}"
_NUMBER = re.compile(
    r"(?P<var>[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?"  # "x = " (answers only)
    r"(?P<sign1>[-+]?)\s*(?:\\?\$|[£€¥])?\s*(?P<sign2>[-+]?)\s*"
    r"(?P<int>\d{1,3}(?:(?P<sep>[, ])\d{3})(?:(?P=sep)\d{3})*|\d+)?(?P<frac>\.\d+)?"
    r"\s*(?P<pct>\\?%|percent\b)?"
    r"\s*(?P<unit>\\(?:text|mbox|mathrm|textrm|textbf)\{\s*(?P<tword>[A-Za-z][A-Za-z .]*)\}"
    rf"(?:\^\{{?[23]\}}?)?|\^\s*\{{?\\circ\}}?|\\circ|°|(?P<word>{_UNIT_WORDS}))?"
)
# Fullwidth digits and punctuation, the minus sign, and unicode spaces. Not NFKC: that reads
# "5²" as "52".
_UNICODE = str.maketrans(
    {**{0xFF10 + d: str(d) for d in range(10)}, 0xFF0C: ",", 0xFF0E: ".", 0x2212: "-"}
    | dict.fromkeys((0x00A0, 0x2009, 0x202F), " ")
)
_SPACES = re.compile(r"\\[,;: ]|~|\\quad|\\qquad")
_THIN_COMMA = re.compile(r",\s*\\!\s*")  # MATH writes 10,\!080 and 11,\! 111


@lru_cache(maxsize=65536)
def as_number(text: str, allow_var: bool = False) -> tuple[Fraction, bool] | None:
    """``(value, is_percent)`` if ``text`` is a plain number (see the module docstring)."""
    if len(text) > 120:  # also keeps int() far below Python's 4,300-digit limit
        return None
    s = text.translate(_UNICODE)
    s = _THIN_COMMA.sub(",", s).replace("{,}", ",").replace("\\!", "")
    s = _SPACES.sub(" ", s).replace("\\left", "").replace("\\right", "")
    s = _strip_delimiters(s)
    if s.endswith("."):
        s = s[:-1]
    m = _NUMBER.fullmatch(s.strip())
    if not m or not (m["int"] or m["frac"]) or (m["sign1"] and m["sign2"]):
        return None
    if m["var"] and not allow_var:
        return None
    words = (m["tword"] or m["word"] or "").lower().replace(".", " ").split()
    if any(w in _NOT_UNITS for w in words):
        return None
    digits = (m["int"] or "0").replace(",", "").replace(" ", "")
    value = Fraction(digits + (m["frac"] or ""))
    if "-" in (m["sign1"] + m["sign2"]):
        value = -value
    return value, bool(m["pct"])


def _numbers_equal(gold: tuple[Fraction, bool], pred: tuple[Fraction, bool]) -> bool:
    """Equal as numbers; a percent also matches its value divided by 100 (25% = 25 = 0.25)."""

    def forms(v: tuple[Fraction, bool]) -> set[Fraction]:
        return {v[0], v[0] / 100} if v[1] else {v[0]}

    return bool(forms(gold) & forms(pred))


# --- the worker process ---------------------------------------------------------------------


def _serve(cpu_limit_s: int, memory_mb: int) -> None:
    """Worker loop: one JSON ``[gold, answer]`` per stdin line, one ``[correct, parsed,
    reason]`` per stdout line; exits at EOF. Run as a subprocess by :class:`Grader`."""
    import logging
    import resource

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not into the protocol
    if memory_mb > 0:
        try:
            limit = memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def parse_boxed(text: str) -> list:
        # math-verify's signal timeout is off (None): the parent enforces the wall clock.
        return parse("\\boxed{" + text + "}", parsing_timeout=None)  # type: ignore[arg-type]

    @lru_cache(maxsize=4096)
    def parse_gold(gold: str) -> tuple:
        # Only sympy objects: an unparsed string fallback is no gold to compare against.
        return tuple(x for x in parse_boxed(gold) if not isinstance(x, str))

    def grade(gold: str, answer: str) -> list:
        golds = parse_gold(gold)
        if not golds:
            return [False, True, "bad gold"]
        preds = parse_boxed(answer)
        if not preds:
            return [False, False, "unparseable"]
        if verify(list(golds), preds, timeout_seconds=None):
            return [True, True, ""]
        return [False, True, "value"]

    grade("1", "1")  # compile math-verify's regexes before saying ready
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        try:  # an orphaned, hung worker dies of SIGXCPU instead of spinning forever
            soft = int(used) + cpu_limit_s
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        except (ValueError, OSError):
            pass
        try:
            gold, answer = json.loads(line)
            reply = grade(gold, answer)
        except Exception as e:  # math-verify catches its own; this is a last resort
            reply = [False, False, f"grader error: {type(e).__name__}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    """One worker subprocess and the caller's end of its pipes."""

    def __init__(self, cpu_limit_s: int, memory_mb: int) -> None:
        src = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        code = f"from ahamoment.grading import _serve; _serve({cpu_limit_s}, {memory_mb})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.ready = False
        self._buf = b""

    def _readline(self, deadline: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError("grading worker exited")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def call(self, gold: str, answer: str, timeout_s: float, start_timeout_s: float) -> list:
        if not self.ready:  # startup (imports) is not charged to the call's timeout
            if self._readline(time.monotonic() + start_timeout_s) != "ready":
                raise EOFError("grading worker did not start")
            self.ready = True
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([gold, answer]) + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(self._readline(time.monotonic() + timeout_s))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.detach()

    def detach(self) -> None:
        """Close our pipe ends without touching the process (after a fork, it is not ours)."""
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


_GRADERS: weakref.WeakSet[Grader] = weakref.WeakSet()


class Grader:
    """A pool of up to ``workers`` math-verify processes; thread-safe, fork-safe.

    ``timeout_s`` bounds each math-verify call in wall-clock seconds (the answer then scores
    ``timeout``); ``start_timeout_s`` bounds a worker's startup (importing sympy).
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        workers: int = 1,
        start_timeout_s: float = 120.0,
        memory_mb: int = 4096,
    ) -> None:
        if timeout_s <= 0 or workers < 1:
            raise ValueError("need timeout_s > 0 and workers >= 1")
        self.timeout_s = timeout_s
        self.workers = workers
        self.start_timeout_s = start_timeout_s
        self.memory_mb = memory_mb
        self._reset()
        _GRADERS.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: weakref.WeakSet[_Worker] = weakref.WeakSet()  # idle or busy
        self._live = 0  # workers started and not killed

    def _new_worker(self) -> _Worker:
        worker = _Worker(int(self.timeout_s * 2) + 10, self.memory_mb)
        self._all.add(worker)
        return worker

    def start(self) -> None:
        """Start the workers now rather than at the first call that needs one."""
        with self._cond:
            while self._live < self.workers:
                self._idle.append(self._new_worker())
                self._live += 1

    def _acquire(self) -> _Worker:
        with self._cond:
            while not self._idle and self._live >= self.workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return self._new_worker()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._cond:
            if healthy:
                self._idle.append(worker)
            else:
                try:  # replace it now: the new one imports while the caller moves on
                    self._idle.append(self._new_worker())
                except OSError:
                    self._live -= 1
            self._cond.notify()

    def _verify(self, gold: str, answer: str) -> tuple[bool, bool, str]:
        worker = self._acquire()
        healthy = False
        try:
            correct, parsed, reason = worker.call(
                gold, answer, self.timeout_s, self.start_timeout_s
            )
            healthy = True
            return bool(correct), bool(parsed), str(reason)
        except TimeoutError:
            return False, False, "timeout"
        except (EOFError, OSError, ValueError) as e:
            return False, False, f"grader error: {e}"
        finally:
            self._release(worker, healthy)

    def grade(self, gold: str, answer: str) -> Verdict:
        """Is ``answer`` (a tagged answer, a boxed completion, or bare) equal to ``gold``?"""
        # Imported here: ahamoment.tasks imports this module (tasks/math.py).
        from ahamoment.tasks.base import Verdict

        pred = final_answer(answer)
        if pred is None:
            return Verdict(correct=False, parsed=False, reason="no answer")
        if len(pred) > MAX_ANSWER_CHARS or not balanced(pred):
            reason = "too long" if len(pred) > MAX_ANSWER_CHARS else "unparseable"
            return Verdict(correct=False, parsed=False, reason=reason)
        gold = gold.strip() if isinstance(gold, str) else ""
        if not gold or len(gold) > MAX_ANSWER_CHARS or not balanced(gold):
            return Verdict(correct=False, parsed=True, reason="bad gold")
        gold_num, pred_num = as_number(gold), as_number(pred, allow_var=True)
        if gold_num is not None and pred_num is not None:
            if _numbers_equal(gold_num, pred_num):
                return Verdict(correct=True, parsed=True)
            return Verdict(correct=False, parsed=True, reason="value")
        correct, parsed, reason = self._verify(gold, pred)
        return Verdict(correct=correct, parsed=parsed, reason=reason)

    def close(self) -> None:
        """Kill the workers; a later call starts new ones."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for w in idle:
            w.kill()


def _after_fork_in_child() -> None:
    # The workers belong to the parent: drop our pipe ends, start fresh ones on demand.
    global _DEFAULT_LOCK
    _DEFAULT_LOCK = threading.Lock()
    for g in list(_GRADERS):
        for w in list(g._all):
            w.detach()
        g._reset()


def _close_all() -> None:
    for g in list(_GRADERS):
        g.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all)

_DEFAULT: Grader | None = None
_DEFAULT_LOCK = threading.Lock()


def default_grader() -> Grader:
    """The shared grader (one worker, 5 s timeout) used by the ``math`` task."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Grader()
        return _DEFAULT


def grade(gold: str, answer: str) -> Verdict:
    """``default_grader().grade(gold, answer)``."""
    return default_grader().grade(gold, answer)
