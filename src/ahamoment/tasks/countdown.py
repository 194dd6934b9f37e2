"""Countdown: combine the given numbers, each exactly once, into an expression equal to a target.

These instances are registered:

- ``countdown`` (the default): 3 numbers from 1 to 25 with + and -, 10,894 distinct problems.
- ``countdown_tinyzero``: 3 or 4 numbers from 1 to 99 with + - * /, the TinyZero form; it
  also loads the real Countdown-Tasks-3to4 rows.
- ``countdown_tinyzero_100``: the same with targets 1 to 100, the range of the real rows
  (the aha-moment recipe trains on it).
- ``countdown_n3_99_addsub``, ``countdown_n3_99_all``, ``countdown_n4_99_all``,
  ``countdown_n5_99_all``: one count of numbers from 1 to 99 each, targets 1 to 100 reachable
  with integer intermediate results (with
  ``countdown``, the difficulty levels ``COUNTDOWN_LEVELS``), and ``countdown_levels``, all
  five in equal shares (the corpus of the aha base model).

Targets are drawn uniformly over the *distinct* reachable values, not over expressions: with
duplicates, a+b+c dominates and a constant template looks like learning.

The pretraining traces search left-to-right chains such as ``7-5=2,2+13=15|15,yes``: each try
ends with ``|target`` and the verdict, so the model compares two adjacent numbers instead of
looking back to the prompt, which a model of under a million parameters does poorly.
A claimed hit may be followed by a check line, ``wait,check:16-15=1,no`` (check_by_difference:
subtract the smaller of result and target from the larger) or ``wait,check:2+13=15|16,no``
(repeat the last step and the comparison); its verdict is always right. Chains keep
every intermediate result a non-negative integer, so a step is always ``a{op}b=r`` over plain
digits. For + and - every reachable target has such a chain; for * and / some targets are
reachable only by other bracketings, so a noiseless trace can still miss them.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from math import comb, gcd
from typing import TypeVar

from ahamoment.data import DataError, read_jsonl, row_id, show
from ahamoment.language import to_foreign
from ahamoment.registry import Registry
from ahamoment.tasks import TASKS
from ahamoment.tasks.base import Problem, Task, Template, TraceNoise, Verdict
from ahamoment.tasks.expr import MAX_LITERAL, ExprError, evaluate

_OP_WORDS = {1: "{0}", 2: "{0} and {1}", 3: "{0}, {1} and {2}", 4: "{0}, {1}, {2} and {3}"}


@dataclass(frozen=True)
class Chain:
    """One left-to-right try: steps ``(a, op, b, result)`` and the flat expression."""

    steps: tuple[tuple[int, str, int, int], ...]
    expr: str

    @property
    def value(self) -> int:
        return self.steps[-1][3]


# "58+82-4:" (named_tries) or "try:58+82-4=" (guess_first): the expression a try names
_NAMED_TRY = re.compile(r"(?:try:)?([\d+\-*/()]+?)(?::|=\d+$)")


def _num(n: int, reverse: bool) -> str:
    return str(n)[::-1] if reverse else str(n)


def _step(a: int, op: str, b: int, r: int, reverse: bool = False) -> str:
    return f"{_num(a, reverse)}{op}{_num(b, reverse)}={_num(r, reverse)}"


class Countdown(Task):
    """Countdown with ``n_numbers`` numbers drawn from ``[lo, hi]`` and operators ``ops``."""

    def __init__(
        self,
        name: str,
        n_numbers: tuple[int, ...],
        lo: int,
        hi: int,
        ops: str,
        max_target: int | None = None,
        integer_steps: bool = False,
    ) -> None:
        if not ops or set(ops) - set("+-*/") or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be a non-empty subset of '+-*/', got {ops!r}")
        if not n_numbers or min(n_numbers) < 2:
            raise ValueError(f"n_numbers must all be >= 2, got {n_numbers}")
        if not (0 <= lo <= hi <= MAX_LITERAL and hi >= 1):
            raise ValueError(f"need 0 <= lo <= hi <= {MAX_LITERAL}, hi >= 1; got {lo}, {hi}")
        self.name = name
        self.n_numbers = tuple(n_numbers)
        self.lo, self.hi = lo, hi
        self.ops = "".join(o for o in "+-*/" if o in ops)
        self.max_target = max_target
        self.integer_steps = integer_steps
        """Targets are those reachable with non-negative integer intermediate results (the
        game's own rule, and 40x faster to enumerate on 5 numbers); else any rational ones."""

    # --- problems ---------------------------------------------------------------------------

    def reachable(self, nums: tuple[int, ...]) -> tuple[int, ...]:
        """Sorted distinct positive integer targets reachable from sorted ``nums``, each once."""
        if self.integer_steps and self.ops != "+-":
            return _reachable_int(nums, self.ops, self.max_target)
        return _reachable(nums, self.ops, self.max_target)

    def _question(self, nums: list[int], target: int) -> str:
        ops = _OP_WORDS[len(self.ops)].format(*self.ops)
        return (
            f"Using the numbers {nums}, create an equation that equals {target}. "
            f"You can use {ops} and each number must be used exactly once."
        )

    def make(self, nums: list[int], target: int, id: str | None = None) -> Problem:
        """A problem of this task from its numbers and target."""
        key = f"{','.join(map(str, sorted(nums)))}->{target}"
        return Problem(
            id=id or f"{self.name}:{key}",
            task=self.name,
            question=self._question(nums, target),
            answer=str(target),
            fields={"nums": list(nums), "target": target},
        )

    def sample(self, rng: random.Random) -> Problem:
        while True:
            k = rng.choice(self.n_numbers)
            nums = [rng.randint(self.lo, self.hi) for _ in range(k)]
            targets = self.reachable(tuple(sorted(nums)))
            if targets:  # empty only when every number drawn is 0
                return self.make(nums, rng.choice(targets))

    def canonical(self, problem: Problem) -> str:
        nums = sorted(problem.fields["nums"])
        return f"{','.join(map(str, nums))}->{problem.fields['target']}"

    def count_space(self, max_multisets: int = 500_000) -> int:
        """Exact number of distinct (sorted numbers, positive reachable target) problems."""
        width = self.hi - self.lo + 1
        total_sets = sum(_n_multisets(width, k) for k in set(self.n_numbers))
        if total_sets > max_multisets:
            raise NotImplementedError(
                f"{self.name}: {total_sets:,} number multisets is too many to enumerate"
            )
        return sum(
            len(self.reachable(nums))
            for k in set(self.n_numbers)
            for nums in itertools.combinations_with_replacement(range(self.lo, self.hi + 1), k)
        )

    def load_jsonl(self, path: str) -> list[Problem]:
        """Rows with ``nums`` (list of ints) and ``target`` (int); ``id`` is optional."""
        out = []
        for lineno, row in read_jsonl(path):
            nums, target = row.get("nums"), row.get("target")
            if not (
                isinstance(nums, list)
                and len(nums) >= 2
                and all(type(n) is int and 0 <= n <= MAX_LITERAL for n in nums)
            ):
                raise DataError(
                    f"{path}:{lineno}: 'nums' must be a list of at least 2 integers in "
                    f"[0, {MAX_LITERAL}], got {show(nums)}"
                )
            if type(target) is not int:
                raise DataError(f"{path}:{lineno}: 'target' must be an integer, got {show(target)}")
            out.append(self.make(nums, target, id=row_id(row, path, lineno)))
        return out

    # --- grading ----------------------------------------------------------------------------

    def normalize(self, answer: str) -> str:
        """The answer without whitespace (the key for majority voting)."""
        return "".join(answer.split())

    def verify(self, problem: Problem, answer: str) -> Verdict:
        if not isinstance(answer, str):
            return Verdict(correct=False, parsed=False, reason="unparseable")
        text = answer.strip()
        if text.count("=") == 1:
            left, right = text.split("=")
            if _is_number(right.strip()):
                text = left
        try:
            value, literals = evaluate(text, self.ops)
        except ExprError as e:
            if e.reason == "division by zero":
                return Verdict(correct=False, parsed=True, reason="division by zero")
            return Verdict(correct=False, parsed=False, reason="unparseable")
        nums, target = problem.fields.get("nums"), problem.fields.get("target")
        if not isinstance(nums, list) or type(target) is not int:
            # A gold answer we cannot read must never give credit.
            return Verdict(correct=False, parsed=True, reason="bad gold")
        if Counter(literals) != Counter(nums):
            return Verdict(correct=False, parsed=True, reason="numbers")
        if value != target:
            return Verdict(correct=False, parsed=True, reason="value")
        return Verdict(correct=True, parsed=True)

    def tried_answer(self, line: str) -> str | None:
        """The expression a reasoning line tries, where the line names it: a named try
        (``58+82-4:85+28=041,...``) or a guess (``try:58+82-4=136``); else None."""
        m = _NAMED_TRY.match(line.strip())
        return m.group(1) if m else None

    def templates(self) -> list[Template]:
        """Sign patterns over the numbers sorted descending (largest always +), sum, product."""
        out: list[Template] = []
        if "+" in self.ops and "-" in self.ops:
            for k in sorted(set(self.n_numbers)):
                for signs in itertools.product("+-", repeat=k - 1):
                    name = "s0" + "".join(f"{s}s{i + 1}" for i, s in enumerate(signs))
                    out.append((name, _sign_template(signs)))
        elif "+" in self.ops:
            out.append(("sum", lambda p: "+".join(map(str, p.fields["nums"]))))
        if "*" in self.ops:
            out.append(("product", lambda p: "*".join(map(str, p.fields["nums"]))))
        return out

    # --- traces -----------------------------------------------------------------------------

    def chains(self, nums: list[int], search_ops: str = "") -> list[Chain]:
        """All distinct left-to-right chains whose intermediate results are integers >= 0,
        over ``search_ops`` (default: the task's operators)."""
        out = []
        for perm in sorted(set(itertools.permutations(nums))):
            for ops in itertools.product(search_ops or self.ops, repeat=len(perm) - 1):
                chain = _chain(perm, ops)
                if chain is not None:
                    out.append(chain)
        return out

    def trace(self, problem: Problem, rng: random.Random, noise: TraceNoise) -> str:
        """A noisy search over chains in the order ``noise.search_order`` picks; grammar in the
        module docstring."""
        target = problem.fields["target"]
        cands, order = SEARCH_ORDERS.get(noise.search_order)(self, problem, rng, noise.search_ops)
        search = _guesses if noise.guess_first else _tries
        lines, answer = search(order, cands, target, rng, noise)
        answer = answer or order[-1].expr  # every candidate tried and missed
        drop_tags = rng.random() < noise.p_drop_tags
        if noise.p_foreign > 0:  # drawn only then, so a monolingual corpus is unchanged
            lines = [to_foreign(ln) if rng.random() < noise.p_foreign else ln for ln in lines]
        return _render(lines, answer, drop_tags)


SearchOrder = Callable[["Countdown", Problem, random.Random, str], tuple[list[Chain], list[Chain]]]
SEARCH_ORDERS: Registry[SearchOrder] = Registry("search order")
"""How a corpus trace orders its tries (``TraceNoise.search_order``): a function of the task,
the problem, the generator and the trace's operators (empty: the task's), returning the
candidates (where a give-up guess draws from) and the order the trace tries them in (it may
stop early)."""


@SEARCH_ORDERS.register("random")
def random_order(
    task: Countdown, problem: Problem, rng: random.Random, ops: str
) -> tuple[list[Chain], list[Chain]]:
    """Every left-to-right chain, shuffled."""
    cands = task.chains(problem.fields["nums"], ops)
    order = cands[:]
    rng.shuffle(order)
    return cands, order


@SEARCH_ORDERS.register("strategy")
def strategy_order(
    task: Countdown, problem: Problem, rng: random.Random, ops: str
) -> tuple[list[Chain], list[Chain]]:
    """Three stages, each shuffled, as a person searches (numbers written largest first):

    1. sums and differences: ``a±b±c…`` over the numbers sorted descending, then the largest
       subtracted last (``b±c…-a``);
    2. a product or quotient of two numbers first, then ± the rest: ``a*b±c…``, ``a/b±c…``;
    3. a sum or difference of two, times or divided by a third, then ± the rest:
       ``(a±b)*c±d…``.

    A chain whose value after its × or ÷ step exceeds the target plus everything left to add
    cannot come back down, and is never tried. On the TinyZero problem set (targets 1–100)
    these cover 92% of the 3-number and 61% of the 4-number real problems, with about 17 and
    80 candidates, against 43 and 500 left-to-right chains in all.
    """
    ops = ops or task.ops
    target, nums = problem.fields["target"], sorted(problem.fields["nums"], reverse=True)
    stages: list[list[Chain]] = [[], [], []]
    seen: set[str] = set()

    def add(stage: int, perm: list[int], chain_ops: tuple[str, ...], mul_at: int = -1) -> None:
        chain = _chain(tuple(perm), chain_ops)
        if chain is None or chain.expr in seen:
            return
        if mul_at >= 0 and chain.steps[mul_at][3] > target + sum(perm[mul_at + 2 :]):
            return
        seen.add(chain.expr)
        stages[stage].append(chain)

    addsub = [o for o in "+-" if o in ops]
    muldiv = [o for o in "*/" if o in ops]
    n = len(nums)
    for signs in itertools.product(addsub, repeat=n - 1):
        add(0, nums, signs)
    if "-" in ops:
        for signs in itertools.product(addsub, repeat=n - 2):
            add(0, nums[1:] + nums[:1], (*signs, "-"))
    pairs = list(itertools.combinations(range(n), 2))
    for i, j in pairs:
        rest = [x for k, x in enumerate(nums) if k not in (i, j)]
        for op in muldiv:
            for signs in itertools.product(addsub, repeat=len(rest)):
                add(1, [nums[i], nums[j], *rest], (op, *signs), mul_at=0)
        for op in addsub:
            for m, c in enumerate(rest):
                others = rest[:m] + rest[m + 1 :]
                for op2 in muldiv:
                    for signs in itertools.product(addsub, repeat=len(others)):
                        add(2, [nums[i], nums[j], c, *others], (op, op2, *signs), mul_at=1)
    for stage in stages:
        rng.shuffle(stage)
    order = [c for stage in stages for c in stage]
    return order, order


Searched = tuple[list[str], str | None]
"""The reasoning lines of a search and its answer (None: every candidate tried and missed)."""


def _tries(order, cands, target: int, rng: random.Random, noise: TraceNoise) -> Searched:
    """Compute each chain, then judge it."""
    shown = _num(target, noise.reversed_digits)
    # Each try ends with "|target": the comparison is between two adjacent numbers. Without
    # it (inline_target False) the verdict must recall the target from the prompt.
    against = f"|{shown}" if noise.inline_target else ""
    lines: list[str] = []
    for chain in order:
        steps = [_step(*s, reverse=noise.reversed_digits) for s in chain.steps]
        # named_tries: "58+82-4:" first, so the answer copies it rather than un-reversing digits
        tried = (f"{chain.expr}:" if noise.named_tries else "") + ",".join(steps) + against
        if chain.value == target:
            lines.append(tried + ",yes")
            if rng.random() < noise.p_check:
                lines.append(_check(steps[-1], chain.value, target, shown, noise))
            return lines, chain.expr
        if rng.random() < noise.p_false_hit:
            # A comparison slip: the arithmetic stays right but the miss is called a hit.
            lines.append(tried + ",yes")
            if rng.random() >= noise.p_check:
                return lines, chain.expr
            lines.append(_check(steps[-1], chain.value, target, shown, noise))
        else:
            lines.append(tried + ",no")
        if rng.random() < noise.p_give_up:
            return lines, _give_up(chain, cands, rng, noise)
    return lines, None


def _check(step: str, value: int, target: int, shown: str, noise: TraceNoise) -> str:
    """The 'wait,check:' line after a claimed hit; its verdict is always right."""
    verdict = "yes" if value == target else "no"
    if noise.check_by_difference:
        hi, lo = max(value, target), min(value, target)
        r = noise.reversed_digits
        return f"wait,check:{_step(hi, '-', lo, hi - lo, reverse=r)},{verdict}"
    return f"wait,check:{step}|{shown},{verdict}"


def _guesses(order, cands, target: int, rng: random.Random, noise: TraceNoise) -> Searched:
    """Claim each chain hits, then commit to it or check it step by step (guess_first)."""
    shown = _num(target, noise.reversed_digits)
    lines: list[str] = []
    for chain in order:
        lines.append(f"try:{chain.expr}={target}")
        if rng.random() >= noise.p_check:
            return lines, chain.expr  # an unverified guess
        steps = [_step(*s, reverse=noise.reversed_digits) for s in chain.steps]
        hit = chain.value == target
        lines.append(f"wait,check:{','.join(steps)}|{shown},{'yes' if hit else 'no'}")
        if hit:
            return lines, chain.expr
        if rng.random() < noise.p_give_up:
            return lines, _give_up(chain, cands, rng, noise)
    return lines, None


def _give_up(last: Chain, cands: list[Chain], rng: random.Random, noise: TraceNoise) -> str:
    """The answer of a search that stops: a random candidate (p_guess) or the last try."""
    return rng.choice(cands).expr if rng.random() < noise.p_guess else last.expr


def _render(lines: list[str], answer: str, drop_tags: bool) -> str:
    if drop_tags:
        return "\n".join([*lines, answer])
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{answer}</answer>"


def _chain(perm: tuple[int, ...], ops: tuple[str, ...]) -> Chain | None:
    acc, expr, last_op = perm[0], str(perm[0]), ""
    steps = []
    for op, b in zip(ops, perm[1:]):
        if op == "+":
            r = acc + b
        elif op == "-":
            r = acc - b
        elif op == "*":
            r = acc * b
        elif b == 0 or acc % b:
            return None
        else:
            r = acc // b
        if r < 0:
            return None
        # Brackets make standard precedence give the chain's left-to-right value.
        if op in "*/" and last_op in ("+", "-"):
            expr = f"({expr})"
        expr, last_op = f"{expr}{op}{b}", op
        steps.append((acc, op, b, r))
        acc = r
    return Chain(tuple(steps), expr)


@lru_cache(maxsize=200_000)
def _reachable(nums: tuple[int, ...], ops: str, max_target: int | None) -> tuple[int, ...]:
    if ops == "+-":
        # Any bracketing of + and - is a sum of +-n with at least one plus; the patterns with
        # n0 positive and their negations cover all of them.
        values: set[tuple[int, int]] = set()
        for signs in itertools.product((1, -1), repeat=len(nums) - 1):
            s = nums[0] + sum(sg * n for sg, n in zip(signs, nums[1:]))
            values.update(((s, 1), (-s, 1)))
    else:
        values = _tree_values(nums, ops)
    out = sorted(
        p for p, q in values if q == 1 and p > 0 and (max_target is None or p <= max_target)
    )
    return tuple(out)


@lru_cache(maxsize=200_000)
def _reachable_int(nums: tuple[int, ...], ops: str, max_target: int | None) -> tuple[int, ...]:
    """As ``_reachable``, over binary trees whose every intermediate result is an integer >= 0."""
    top = _subset_values(list(nums), lambda a, b: _combine_int(a, b, ops))
    return tuple(sorted(v for v in top if v > 0 and (max_target is None or v <= max_target)))


def _combine_int(a: int, b: int, ops: str) -> list[int]:
    out = []
    if "+" in ops:
        out.append(a + b)
    if "-" in ops:
        out.append(abs(a - b))
    if "*" in ops:
        out.append(a * b)
    if "/" in ops:
        if b and a % b == 0:
            out.append(a // b)
        if a and b % a == 0:
            out.append(b // a)
    return out


Rational = tuple[int, int]
"""(numerator, denominator) in lowest terms, denominator > 0: integer pairs, cheaper than
``fractions.Fraction``."""

V = TypeVar("V")


def _subset_values(leaves: list[V], combine: Callable[[V, V], list[V]]) -> set[V]:
    """Every value of every binary tree over ``leaves`` (each used once); ``combine(a, b)``
    gives the values of a node over subtrees of values a and b, in both operand orders."""
    n = len(leaves)
    by_mask: dict[int, set[V]] = {1 << i: {v} for i, v in enumerate(leaves)}
    for mask in range(1, 1 << n):
        if mask in by_mask:
            continue
        out: set[V] = set()
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            if sub < rest:  # each unordered split once; combine tries both operand orders
                for a in by_mask[sub]:
                    for b in by_mask[rest]:
                        out.update(combine(a, b))
            sub = (sub - 1) & mask
        by_mask[mask] = out
    return by_mask[(1 << n) - 1]


def _tree_values(nums: tuple[int, ...], ops: str) -> set[Rational]:
    """Every value of every binary tree over ``nums`` (each used once) with ``ops``."""
    return _subset_values([(v, 1) for v in nums], lambda a, b: _combine(a, b, ops))


def _reduced(p: int, q: int) -> Rational:
    if q < 0:
        p, q = -p, -q
    g = gcd(p, q)
    return p // g, q // g


def _combine(a: Rational, b: Rational, ops: str) -> list[Rational]:
    (ap, aq), (bp, bq) = a, b
    out = []
    if "+" in ops:
        out.append(_reduced(ap * bq + bp * aq, aq * bq))
    if "-" in ops:
        d = ap * bq - bp * aq
        out += [_reduced(d, aq * bq), _reduced(-d, aq * bq)]
    if "*" in ops:
        out.append(_reduced(ap * bp, aq * bq))
    if "/" in ops:
        if bp:
            out.append(_reduced(ap * bq, aq * bp))
        if ap:
            out.append(_reduced(bp * aq, bq * ap))
    return out


def _n_multisets(width: int, k: int) -> int:
    return comb(width + k - 1, k)


def _is_number(s: str) -> bool:
    return s.isascii() and (s[1:] if s.startswith("-") else s).isdigit()


def _sign_template(signs: tuple[str, ...]) -> Callable[[Problem], str]:
    def fn(p: Problem) -> str:
        nums = sorted(p.fields["nums"], reverse=True)
        if len(nums) != len(signs) + 1:
            return ""  # the pattern is for another count of numbers
        return str(nums[0]) + "".join(f"{s}{n}" for s, n in zip(signs, nums[1:]))

    return fn


COUNTDOWN = TASKS.add("countdown", Countdown("countdown", (3,), 1, 25, "+-"))
COUNTDOWN_TINYZERO = TASKS.add(
    "countdown_tinyzero",
    Countdown("countdown_tinyzero", (3, 4), 1, 99, "+-*/", max_target=1000),
)
COUNTDOWN_TINYZERO_100 = TASKS.add(
    "countdown_tinyzero_100",
    Countdown("countdown_tinyzero_100", (3, 4), 1, 99, "+-*/", max_target=100),
)


def _level(n: int, hi: int, ops: str) -> Countdown:
    name = f"countdown_n{n}_{hi}_{'addsub' if ops == '+-' else 'all'}"
    return TASKS.add(name, Countdown(name, (n,), 1, hi, ops, max_target=100, integer_steps=True))


COUNTDOWN_LEVELS: tuple[Countdown, ...] = (
    COUNTDOWN,  # 3 numbers 1..25, + and -
    _level(3, 99, "+-"),
    _level(3, 99, "+-*/"),  # with the 4-number level: the two halves of countdown_tinyzero_100
    _level(4, 99, "+-*/"),
    _level(5, 99, "+-*/"),
)
"""Countdown difficulty levels, easiest first (targets up to 100 beyond the first): the
adaptive curriculum's levels (``rl/curriculum.py``) and the aha base's corpus."""


class CountdownLevels(Countdown):
    """Every level of ``COUNTDOWN_LEVELS`` in equal shares: a problem is drawn from a level
    chosen uniformly, and keeps that level's task name, so it is verified and traced by it.
    Its held-out set is each level's and the TinyZero set's (``shares_heldout_with``)."""

    def __init__(self, name: str, levels: tuple[Countdown, ...]) -> None:
        super().__init__(name, (3, 4, 5), 1, 99, "+-*/", max_target=100, integer_steps=True)
        self.levels = levels
        self.shares_heldout_with = ("countdown_tinyzero_100", *(lv.name for lv in levels))

    def sample(self, rng: random.Random) -> Problem:
        return rng.choice(self.levels).sample(rng)

    def trace(self, problem: Problem, rng: random.Random, noise: TraceNoise) -> str:
        return TASKS.get(problem.task).trace(problem, rng, noise)


TASKS.add("countdown_levels", CountdownLevels("countdown_levels", COUNTDOWN_LEVELS))
