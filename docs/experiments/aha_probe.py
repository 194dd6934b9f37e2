"""Probe a Countdown model's search behaviour (docs/experiments/aha-moment.md).

    python docs/experiments/aha_probe.py MODEL_DIR [--task T] [--n 200] [--k 4] [--real]

Samples held-out problems (or the real TinyZero sample) at T=1 and reports, over all tries
written in the reasoning: the verdict's reliability (a try's "yes"/"no" against whether its
written result equals the target), how often a claimed hit is re-checked and how reliable the
check is, tries per completion, and how a completion ends (a true hit, a false hit, giving up).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch

from ahamoment.evaluation import generate
from ahamoment.models import load_model, load_tokenizer
from ahamoment.prompts import encode_prompts, stop_ids
from ahamoment.rewards import judge
from ahamoment.rollout import SamplingParams, TorchEngine
from ahamoment.splits import heldout, real_countdown

STEP = re.compile(r"(?<![\d+\-*/])(\d+)([+\-*/])(\d+)=(\d+)")
GUESS = re.compile(r"try:([\d+\-]+)=\d+")


def evaluate_plain(expr: str) -> int | None:
    """Value of a +/- expression such as 58+82-4 (None if malformed)."""
    if not re.fullmatch(r"\d+([+-]\d+)*", expr):
        return None
    total, sign = 0, 1
    for tok in re.findall(r"[+-]|\d+", expr):
        if tok in "+-":
            sign = 1 if tok == "+" else -1
        else:
            total += sign * int(tok)
    return total


def probe(texts: list[str], problems: list, reverse: bool = False) -> dict[str, float]:
    """``reverse``: the reasoning writes numbers least-significant digit first."""

    def val(s: str) -> int:
        return int(s[::-1]) if reverse else int(s)

    c: Counter = Counter()
    for text, p in zip(texts, problems):
        target = p.fields["target"]
        think = text.split("</think>")[0]
        lines = [ln for ln in think.split("\n") if ln and not ln.startswith("<")]
        tries = 0
        end = "gave up"
        guess = None  # the true value of the last "try:" claim (guess_first traces)
        for i, ln in enumerate(lines):
            claim = GUESS.fullmatch(ln)
            if claim:
                c["guesses"] += 1
                nums = sorted(int(x) for x in re.findall(r"\d+", claim.group(1)))
                c["valid_guesses"] += nums == sorted(p.fields["nums"])
                guess = evaluate_plain(claim.group(1))
                c["guesses_true"] += guess == target
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                c["guesses_checked"] += nxt.startswith("wait")
                continue
            if ln.startswith("wait") and guess is not None and ln[-3:] in (",no", "yes"):
                said_yes = ln.endswith(",yes")
                c["gchecks_true" if guess == target else "gchecks_false"] += 1
                c["gyes_true" if guess == target else "gyes_false"] += said_yes
                guess = None
            steps = STEP.findall(ln)
            verdict = ln.rsplit(",", 1)[-1]
            if not steps or verdict not in ("yes", "no"):
                continue
            for a, op, b, r in steps:
                c["steps"] += 1
                c["steps_right"] += val(r) == {"+": val(a) + val(b), "-": val(a) - val(b)}.get(op)
            a, op, b, r = steps[-1]
            written = val(r)
            true = {"+": val(a) + val(b), "-": val(a) - val(b)}.get(op)
            hit = written == target
            if ln.startswith("wait"):
                c["checks"] += 1
                c["check_right"] += (verdict == "yes") == (hit and written == true)
                continue
            tries += 1
            c["tries"] += 1
            c["hits"] += hit
            c["yes_on_miss"] += (not hit) and verdict == "yes"
            c["misses"] += not hit
            c["no_on_hit"] += hit and verdict == "no"
            if verdict == "yes":
                c["claims"] += 1
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                c["claims_checked"] += nxt.startswith("wait")
                end = "true hit" if hit else "false hit"
        c["completions"] += 1
        c[f"end: {end}"] += 1
        c["correct"] += judge(p, text)[1].correct
        c["tries_total"] += tries
    n = max(1, c["completions"])
    out = {
        "pass1": c["correct"] / n,
        "step accuracy": c["steps_right"] / max(1, c["steps"]),
    }
    if c["tries"]:  # computed tries with a verdict (the default grammar)
        out |= {
            "tries/completion": c["tries_total"] / n,
            "P(yes | miss)": c["yes_on_miss"] / max(1, c["misses"]),
            "P(no | hit)": c["no_on_hit"] / max(1, c["hits"]),
            "claims checked": c["claims_checked"] / max(1, c["claims"]),
            "check accuracy": c["check_right"] / max(1, c["checks"]),
            **{k: v / n for k, v in c.items() if k.startswith("end: ")},
        }
    out["checks/completion"] = c["checks"] / n
    return out | (
        {
            "guesses/completion": c["guesses"] / n,
            "valid guesses": c["valid_guesses"] / c["guesses"],
            "true guesses": c["guesses_true"] / c["guesses"],
            "guesses checked": c["guesses_checked"] / c["guesses"],
            "check: P(yes | true guess)": c["gyes_true"] / max(1, c["gchecks_true"]),
            "check: P(yes | false guess)": c["gyes_false"] / max(1, c["gchecks_false"]),
        }
        if c["guesses"]
        else {}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--task", default="countdown_tinyzero_100")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--real", action="store_true", help="the 1,024 real TinyZero problems")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    problems = list(real_countdown())[: args.n] if args.real else heldout(args.task, args.n)
    rows = [p for p in problems for _ in range(args.k)]
    params = SamplingParams(args.temperature, 1.0, 0, args.max_new_tokens, stop_ids(tok))
    engine = TorchEngine(model, tok, max_batch_rows=256)
    gen = generate(engine, tok, encode_prompts(tok, rows), params, torch.Generator().manual_seed(0))
    texts = [c.text for c in gen]
    meta = json.loads((Path(args.model) / "ahamoment_pretrain.json").read_text())
    reverse = bool(meta.get("config", {}).get("reversed_digits"))
    for key, v in probe(texts, rows, reverse).items():
        print(f"{key:>20}: {v:.3f}")
    print(f"{'mean length':>20}: {sum(c.length for c in gen) / len(gen):.1f}")
    for t in texts[:3]:
        print("---\n" + t)


if __name__ == "__main__":
    main()
