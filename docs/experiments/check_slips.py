"""What the checks of an aha run have to catch: false "yes" verdicts per window of RL steps.

    python docs/experiments/check_slips.py RUN_DIR [RUN_DIR ...] [--window 50]
    python docs/experiments/check_slips.py EVAL_DIR [EVAL_DIR ...]

Reads the rollouts a run logged (``samples.jsonl``, written by `aha zero`), or every sample of
an `aha eval` output directory (``results.jsonl``, one line for all), on the aha base's
named-try format (``49+32-6:94+23=18,18-6=57|57,yes``: the expression, its steps with digits
reversed, then the target and the verdict). For every try line it evaluates the named
expression exactly (``tasks.expr.evaluate``) and prints, per window of steps:

- tries: try lines read;
- P(yes | miss): share of tries whose expression misses the target but whose verdict is "yes"
  (the slip a `wait,check:` line can catch);
- P(no | hit): share of tries that hit the target but are called "no" (no check follows a "no");
- checked: share of those false "yes" that a check line follows.

A check can only reject (and so self-correct) after a false "yes": when P(yes | miss) falls,
self-correction falls with it whatever the checks are worth.
"""

from __future__ import annotations

import argparse
import json
import re
from fractions import Fraction
from pathlib import Path

from ahamoment.tasks.expr import ExprError, evaluate

TRY = re.compile(r"^([\d+\-*/()]+):.*\|\d+,(yes|no)$")
TARGET = re.compile(r"equals (\d+)")


def value(text: str) -> Fraction | None:
    """The exact value of a tried expression (None if it cannot be read)."""
    try:
        return evaluate(text)[0]
    except ExprError:
        return None


def window_stats(rows: list[dict]) -> dict[str, float | int]:
    tries = miss = false_yes = hit = false_no = checked = 0
    for r in rows:
        target = int(TARGET.search(r["problem"]).group(1))
        lines = r["completion"].split("</think>")[0].splitlines()
        for i, line in enumerate(lines):
            m = TRY.match(line.strip())
            if not m:
                continue
            tries += 1
            said_yes = m.group(2) == "yes"
            if value(m.group(1)) == target:
                hit += 1
                false_no += not said_yes
            else:
                miss += 1
                if said_yes:
                    false_yes += 1
                    checked += i + 1 < len(lines) and "check" in lines[i + 1]
    return {
        "tries": tries,
        "p_yes_miss": false_yes / miss if miss else float("nan"),
        "p_no_hit": false_no / hit if hit else float("nan"),
        "false_yes": false_yes,
        "checked": checked / false_yes if false_yes else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--window", type=int, default=50)
    args = ap.parse_args()
    for run in args.runs:
        if (run / "results.jsonl").exists():  # an `aha eval` directory: one line for all
            rows = [
                {"problem": r["question"], "completion": c}
                for r in map(json.loads, (run / "results.jsonl").open())
                for c in r["samples"]
            ]
            s = window_stats(rows)
            print(
                f"{run} | {len(rows)} completions | {s['tries']} tries | P(yes / miss) "
                f"{s['p_yes_miss']:.3f} | P(no / hit) {s['p_no_hit']:.3f} | false yes checked "
                f"{s['checked']:.2f} of {s['false_yes']}"
            )
            continue
        rows = [json.loads(ln) for ln in (run / "samples.jsonl").open()]
        last = max(r["step"] for r in rows)
        print(f"\n{run}\n| steps | tries | P(yes / miss) | P(no / hit) | false yes checked |")
        print("|---|---|---|---|---|")
        for a in range(0, last, args.window):
            s = window_stats([r for r in rows if a < r["step"] <= a + args.window])
            print(
                f"| {a + 1}–{min(a + args.window, last)} | {s['tries']} | {s['p_yes_miss']:.3f} "
                f"| {s['p_no_hit']:.3f} | {s['checked']:.2f} of {s['false_yes']} |"
            )


if __name__ == "__main__":
    main()
