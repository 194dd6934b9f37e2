"""Why a Countdown model misses: sample held-out problems at T=1 and sort every completion.

    python docs/experiments/failure_modes.py MODEL_DIR [--n 300] [--k 4] [--max-new-tokens 192]

Categories (each completion lands in exactly one; they sum to 1):

- correct: the answer verifies;
- truncated: cut off before an answer (a format failure);
- no_answer: finished without an <answer> (e.g. a trace that dropped its tags);
- gave_up: answered without ever saying "yes" to a try;
- false_hit_arith: said "yes" to a try whose arithmetic is wrong (usually a result written as
  the target: a hallucinated hit);
- false_hit_compare: said "yes" to a correctly computed try whose result is not the target;
- other: said "yes" to a right try and still answered something else.

Per try line it also reports the share of correct steps (the T=1 arithmetic) and
P(yes | result != target), the comparison slip the corpus teaches (p_false_hit).

Last, a teacher-forced probe of the verdict alone: for the first 8 chains of each problem it
feeds the correctly computed try line (``a+b=r,r-c=R|T,``) and reads P(yes) / (P(yes) + P(no))
at the verdict, grouped by |R - T|. It separates the corpus noise (about p_false_hit on far
misses) from a comparator that cannot tell near numbers apart (high P(yes) at |R - T| <= 2).
Reads the embedded default task's format (`a+b=r,r+c=R|T,yes`); standard digits only.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from ahamoment.evaluation import generate
from ahamoment.models import load_model, load_tokenizer, set_threads
from ahamoment.prompts import encode_prompts, stop_ids
from ahamoment.rewards import extract_answer
from ahamoment.rollout import SamplingParams, TorchEngine
from ahamoment.splits import heldout
from ahamoment.tasks import get_task

STEP = re.compile(r"(\d+)([+-])(\d+)=(\d+)")
TRY = re.compile(r"^[\d+\-=,]+\|(\d+),(yes|no)$")


def _right(a: str, op: str, b: str, r: str) -> bool:
    return (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--n", type=int, default=300, help="held-out problems (the first n)")
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)
    task = get_task(args.task)
    problems = [p for p in heldout(args.task, 1000)[: args.n] for _ in range(args.k)]
    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    params = SamplingParams(1.0, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids(tok))
    engine = TorchEngine(model, tok, max_batch_rows=256)
    out = generate(
        engine, tok, encode_prompts(tok, problems), params, torch.Generator().manual_seed(args.seed)
    )
    cat, lines = Counter(), Counter()
    for p, c in zip(problems, out):
        text, finish = c.text, c.finish_reason
        target = p.fields["target"]
        tries = [m for ln in text.split("\n") if (m := TRY.match(ln))]
        lines["tries"] += len(tries)
        for m in tries:
            steps = STEP.findall(m.group(0))
            lines["steps"] += len(steps)
            lines["steps_right"] += sum(_right(*s) for s in steps)
            if int(steps[-1][3] if steps else -1) != int(m.group(1)):
                lines["miss"] += 1
                lines["miss_yes"] += m.group(2) == "yes"
        answer = extract_answer(text)
        if answer is not None and task.verify(p, answer).correct:
            cat["correct"] += 1
        elif answer is None:
            cat["truncated" if finish == "length" else "no_answer"] += 1
        elif not (hits := [m for m in tries if m.group(2) == "yes"]):
            cat["gave_up"] += 1
        else:
            steps = STEP.findall(hits[-1].group(0))
            if not all(_right(*s) for s in steps):
                cat["false_hit_arith"] += 1
            elif not steps or int(steps[-1][3]) != target:
                cat["false_hit_compare"] += 1
            else:
                cat["other"] += 1
    n = len(problems)
    print(f"{args.model}: {args.n} problems x {args.k} samples, T=1, {args.max_new_tokens} tokens")
    for name in ("correct", "truncated", "no_answer", "gave_up", "false_hit_arith",
                 "false_hit_compare", "other"):  # fmt: skip
        print(f"  {name:18s} {cat[name] / n:.3f}")
    print(f"  tries per completion {lines['tries'] / n:.2f}")
    print(f"  correct steps (T=1) {lines['steps_right'] / max(1, lines['steps']):.3f}")
    print(f"  P(yes | miss)       {lines['miss_yes'] / max(1, lines['miss']):.3f}")
    print("teacher-forced P(yes) at the verdict of a correct try, by |result - target|:")
    for name, (count, p_yes) in verdict_probe(model, tok, task, problems[:: args.k]).items():
        print(f"  {name:8s} {p_yes:.3f}  ({count} tries)")


def verdict_probe(model, tok, task, problems, chains_per_problem: int = 8) -> dict:
    """{bucket: (tries, mean P(yes | yes or no))} over correctly computed first tries."""
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    sums: dict[str, list[float]] = {}
    for p, prompt in zip(problems, encode_prompts(tok, problems)):
        target = p.fields["target"]
        for chain in task.chains(p.fields["nums"])[:chains_per_problem]:
            steps = ",".join(f"{a}{op}{b}={r}" for a, op, b, r in chain.steps)
            line = tok(f"<think>\n{steps}|{target},", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                probs = model(torch.tensor([prompt + line])).logits[0, -1].softmax(-1)
            d = abs(chain.value - target)
            bucket = "hit" if d == 0 else "d<=2" if d <= 2 else "d<=9" if d <= 9 else "d>=10"
            sums.setdefault(bucket, []).append((probs[yes] / (probs[yes] + probs[no])).item())
    order = ("hit", "d<=2", "d<=9", "d>=10")
    return {b: (len(sums[b]), sum(sums[b]) / len(sums[b])) for b in order if b in sums}


if __name__ == "__main__":
    main()
