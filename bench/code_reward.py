"""Code rewards against the GRPO step: how much of an `aha zero --task code` step the sandbox takes.

Runs the real stage, `aha zero` with ``recipes/zero-code.yaml`` (only the step count, the
held-out size and the run directory changed: ``--steps`` steps, 8 held-out problems, no
periodic evaluation), with the step's reward call, ``rewards.score`` as ``rl.rollouts`` calls
it, timed. That call is where a step's programs run: ``judge_batch`` hands the batch's distinct
programs to ``CodeTask.verify_many``, which runs them in parallel sandboxes
(``sandbox.run_many``, one worker per CPU this process may use), and every reward and logged
figure then reads the verdicts. The step time is ``step_s`` of metrics.jsonl (rollout, reward,
reference, update; logging and evaluation excluded).

Printed: per step the rollout rows, the sandbox runs (distinct programs), the reward time and
the step time; the medians; and, last, ``code_reward_frac=X``, the sum of reward times over the
sum of step times (the first step, which starts the sandbox's zygote, included). The issue asks
that a step's code rewards not dominate its time: X well below 0.5.

    python bench/code_reward.py              # 20 steps
    python bench/code_reward.py --quick      # 3 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ahamoment import config as cfglib
from ahamoment import rewards
from ahamoment.rl import rollouts
from ahamoment.sandbox import harness
from ahamoment.stages.zero import ZeroConfig, zero

RECIPE = Path(__file__).parent.parent / "recipes" / "zero-code.yaml"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="GRPO steps timed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy box)")
    ap.add_argument("--quick", action="store_true", help="3 steps: a smoke test")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    console = Console()

    timed: list[tuple[float, int]] = []  # (seconds in rewards.score, rows) per call
    runs: list[int] = []  # sandbox runs per call
    real_score, real_run = rollouts.score, harness.run_tests
    lock = threading.Lock()
    in_step = threading.Event()  # set inside a step's reward call; evaluations are not counted

    def counted_run(*a, **kw):
        if in_step.is_set():
            with lock:  # run_many's worker threads
                runs[-1] += 1
        return real_run(*a, **kw)

    def timed_score(problems, completions, weights):
        runs.append(0)
        in_step.set()
        t0 = time.perf_counter()
        try:
            out = real_score(problems, completions, weights)
        finally:
            in_step.clear()
        timed.append((time.perf_counter() - t0, len(completions)))
        return out

    rollouts.score = timed_score  # the step's reward call, as sample_groups makes it
    harness.run_tests = counted_run  # run_many's workers call it once per distinct program
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = cfglib.build(
                ZeroConfig,
                RECIPE,
                steps=steps,
                heldout_n=8,
                eval_every=0,
                save_every=0,
                threads=args.threads,
                out=str(Path(tmp) / "run"),
            )
            rewards._VERDICTS.clear()
            zero(cfg, Console(quiet=True))
            metrics = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").open()]
    finally:
        rollouts.score, harness.run_tests = real_score, real_run

    # one sampling round per step (the recipe keeps every group): call i is step i
    step_s = [m["step_s"] for m in metrics]
    reward_s = [t for t, _ in timed[: len(step_s)]]
    table = Table(title=f"aha zero --recipe {RECIPE.name}: {steps} steps, {args.threads} thread")
    for col in ("step", "rows", "sandbox runs", "reward s", "step s", "reward / step"):
        table.add_column(col, justify="right")
    for i, m in enumerate(metrics):
        table.add_row(
            str(m["step"]),
            str(timed[i][1]),
            str(runs[i]),
            f"{reward_s[i]:.2f}",
            f"{step_s[i]:.2f}",
            f"{reward_s[i] / step_s[i]:.3f}",
        )
    table.add_row(
        "median",
        "",
        str(int(statistics.median(runs[: len(step_s)]))),
        f"{statistics.median(reward_s):.2f}",
        f"{statistics.median(step_s):.2f}",
        "",
    )
    console.print(table)
    console.print(f"sandbox isolation: {harness.isolation()}")
    print(f"code_reward_frac={sum(reward_s) / sum(step_s):.3f}")


if __name__ == "__main__":
    main()
