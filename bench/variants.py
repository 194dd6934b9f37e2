"""Run the CPU R1-Zero recipe once per policy-loss variant, side by side, and tabulate them.

Every variant gets the same base model, seed, prompts, step budget and held-out set, and
several minibatches per rollout batch (so that later minibatches are off-policy and the clip
actually acts). Only the loss (and, where the paper pairs one, the advantage estimator) changes.

    python bench/variants.py                         # grpo, dr_grpo, dapo, gspo; 100 steps each
    python bench/variants.py --steps 200 --variants grpo,dapo

Results go to ``--out`` (default ``runs/variants``): one run directory per variant, plus
``variants.json`` and ``variants.md``. A variant whose ``summary.json`` exists is not rerun, so
an interrupted bench continues where it stopped. The last line compares the best variant with
GRPO: ``best_vs_grpo_pass1=X``.

Columns: held-out sampled pass@1 (mean over k at T=1), greedy accuracy, format rate, mean
completion length on held-out problems, reflection rate; and, from the training log, the mean
rollout length over the first and last 10% of steps (Dr. GRPO's length bias would show as wrong
answers growing longer under the ``grpo`` loss: ``len_wrong_end`` vs ``len_wrong_start``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ahamoment import config as cfglib
from ahamoment.stages.zero import ZeroConfig, zero

ROOT = Path(__file__).resolve().parent.parent

# The loss plus anything its paper changes with it; everything else is the recipe's.
VARIANTS: dict[str, dict[str, object]] = {
    "grpo": {"loss": "grpo", "advantage": "grpo"},
    "dr_grpo": {"loss": "dr_grpo", "advantage": "dr_grpo"},
    "dapo": {"loss": "dapo", "advantage": "grpo", "group_filter": "nonconstant"},
    "gspo": {"loss": "gspo", "advantage": "grpo"},
}


def _wrong_lengths(run: Path, frac: float = 0.1) -> tuple[float, float, float, float]:
    """Mean rollout length (all and wrong-only) over the first and last ``frac`` of steps."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    samples = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines() if ln]
    n = max(1, int(len(rows) * frac))
    last = rows[-1]["step"]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    def wrong(lo: int, hi: int) -> float:
        # samples.jsonl keeps a few completions per step; reward < 1 means not correct.
        # Length in characters (the samples store text), a proxy that only compares runs.
        return mean(
            [len(s["completion"]) for s in samples if lo <= s["step"] <= hi and s["reward"] < 1]
        )

    return (
        mean([r["len_mean"] for r in rows[:n]]),
        mean([r["len_mean"] for r in rows[-n:]]),
        wrong(1, n),
        wrong(last - n + 1, last),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # the full-fine-tuning recipe the README's variant table was measured with
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "zero-countdown-full.yaml"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    ap.add_argument("--steps", type=int, default=100, help="GRPO steps per variant")
    ap.add_argument("--minibatches", type=int, default=4, help="optimizer steps per rollout batch")
    ap.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="learning rate (0: the recipe's divided by --minibatches, so a rollout batch moves "
        "the policy about as far as the recipe's single step; at the recipe's 5e-4 with 4 "
        "minibatches GRPO collapsed within 30 steps)",
    )
    ap.add_argument("--heldout-n", type=int, default=500, help="held-out problems for the table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings)")
    ap.add_argument("--model", default="", help="base model dir (default: the embedded one)")
    ap.add_argument("--out", default="runs/variants")
    args = ap.parse_args(argv)

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    results: dict[str, dict[str, object]] = {}
    for name in names:
        run = out / name
        if not (run / "summary.json").exists():
            console.rule(f"variant {name}")
            if not args.lr:
                recipe_lr = cfglib.build(ZeroConfig, args.recipe).lr
                args.lr = recipe_lr / args.minibatches
            cfg = cfglib.build(
                ZeroConfig,
                args.recipe,
                **VARIANTS[name],
                steps=args.steps,
                minibatches=args.minibatches,
                **({"lr": args.lr} if args.lr else {}),
                heldout_n=args.heldout_n,
                eval_every=0,
                real_eval=False,
                seed=args.seed,
                threads=args.threads,
                model=args.model,
                out=str(run),
                resume=run.exists(),
                samples_per_step=16,
            )
            zero(cfg, console)
        summary = json.loads((run / "summary.json").read_text())
        len0, len1, wrong0, wrong1 = _wrong_lengths(run)
        t, b = summary["trained"], summary["base"]
        results[name] = {
            "pass1": t["pass1"],
            "base_pass1": b["pass1"],
            "greedy_acc": t["greedy_acc"],
            "format_rate": t["format_rate"],
            "mean_len": t["mean_len"],
            "reflection_rate": t["reflection_rate"],
            "len_start": len0,
            "len_end": len1,
            "len_wrong_start": wrong0,
            "len_wrong_end": wrong1,
            "wall_s": summary["wall_s"],
        }

    table = Table(
        title=f"R1-Zero per loss variant: {args.steps} steps, {args.minibatches} minibatches, lr {args.lr:g}, "
        f"seed {args.seed}, held-out {args.heldout_n} (T=1, k=4)"
    )
    cols = [
        ("pass1", "pass@1"),
        ("greedy_acc", "greedy"),
        ("format_rate", "format"),
        ("mean_len", "len (tok)"),
        ("reflection_rate", "reflection"),
        ("len_start", "roll len start"),
        ("len_end", "roll len end"),
        ("len_wrong_start", "wrong len start (chars)"),
        ("len_wrong_end", "wrong len end (chars)"),
        ("wall_s", "wall s"),
    ]
    table.add_column("variant")
    for _, label in cols:
        table.add_column(label, justify="right")
    for name, r in results.items():
        table.add_row(name, *(f"{r[k]:.3f}" if k != "wall_s" else f"{r[k]:.0f}" for k, _ in cols))
    console.print(table)
    base = next(iter(results.values()))["base_pass1"] if results else float("nan")
    console.print(f"base model pass@1: {base:.3f}")

    (out / "variants.json").write_text(json.dumps(results, indent=1))
    md = ["| variant | " + " | ".join(label for _, label in cols) + " |"]
    md.append("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        md.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k, _ in cols) + " |")
    (out / "variants.md").write_text("\n".join(md) + "\n")

    best = max(results, key=lambda k: results[k]["pass1"])  # type: ignore[arg-type,return-value]
    print(f"best_variant={best}")
    if "grpo" in results:
        ratio = results[best]["pass1"] / max(results["grpo"]["pass1"], 1e-9)  # type: ignore[operator]
        print(f"best_vs_grpo_pass1={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
