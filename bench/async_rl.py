"""Asynchronous RL on 2 CPU cores against the synchronous loop: completion tokens per second.

Side A is today's `aha zero`: one process, 2 torch threads, rollout then update then rollout.
Side B is `aha launch`: one `aha serve` rollout process with 1 thread and the `aha zero`
trainer with 1 thread, K = 1 (`--max-staleness 1 --tis-cap 2`): step t+1 is sampled while
step t trains. Both run the README recipe (`recipes/zero-countdown.yaml`) on the shipped base
for ``--steps`` steps, with no periodic evaluation and a small final one. The figure is
completion tokens sampled per second of the training loop, from each run's metrics.jsonl:
sum over steps of (mean completion length x rows sampled) / sum of ``step_s``, the first
``--skip`` steps left out (warm-up; B's first batch cannot overlap anything). The sides
alternate ``--repeats`` times; the speedup is the median of the back-to-back pairs' ratios.

A third side, the synchronous loop with 1 thread, gives the ceiling of any split into two
1-thread processes: they do at most twice its work per second, so B / A can reach at most
2 x (1-thread rate) / (2-thread rate), printed as ``async_ceiling`` (with perfect overlap and
no transfer cost).

    python bench/async_rl.py             # ~8 min
    python bench/async_rl.py --quick     # smoke

The last line is ``async_speedup=X``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "zero-countdown.yaml")


def zero_flags(steps: int, out: Path) -> list[str]:
    return [
        "--recipe", RECIPE, "--steps", str(steps), "--eval-every", "0", "--heldout-n", "16",
        "--eval-k", "1", "--no-real-eval", "--save-every", "0", "--out", str(out),
    ]  # fmt: skip


def tokens_per_s(run: Path, skip: int) -> tuple[float, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][skip:]
    cfg = {"P": 16, "G": 8}
    tokens = sum(r["len_mean"] * cfg["P"] * cfg["G"] * r["sampling_rounds"] for r in rows)
    wall = sum(r["step_s"] for r in rows)
    return tokens / wall, wall / len(rows)


def run_sync(steps: int, out: Path, threads: int = 2) -> None:
    cmd = [sys.executable, "-m", "ahamoment.cli", "zero", *zero_flags(steps, out)]
    cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)


def run_async(steps: int, out: Path, port: int) -> None:
    flags = [*zero_flags(steps, out), "--max-staleness", "1", "--tis-cap", "2"]
    cmd = [sys.executable, "-m", "ahamoment.cli", "launch", "--servers", "1"]
    cmd += ["--server-threads", "1", "--trainer-threads", "1", "--port", str(port)]
    cmd += ["--zero-args", shlex.join(flags)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=8190)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.skip, args.repeats = 8, 2, 1
    ratios, ceilings = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            run_sync(args.steps, Path(tmp) / f"one{i}", threads=1)
            one, one_step = tokens_per_s(Path(tmp) / f"one{i}", args.skip)
            t = time.time()
            run_sync(args.steps, Path(tmp) / f"sync{i}")
            a, a_step = tokens_per_s(Path(tmp) / f"sync{i}", args.skip)
            t_a = time.time() - t
            t = time.time()
            run_async(args.steps, Path(tmp) / f"async{i}", args.port)
            b, b_step = tokens_per_s(Path(tmp) / f"async{i}", args.skip)
            t_b = time.time() - t
            ratios.append(b / a)
            ceilings.append(2 * one / a)
            print(
                f"repeat {i}: sync 1 thread {one:,.0f} tok/s ({one_step:.2f} s/step); "
                f"sync (1 process, 2 threads) {a:,.0f} tok/s ({a_step:.2f} s/step, "
                f"run {t_a:.0f} s); async K=1 (server 1 thread + trainer 1 thread) {b:,.0f} "
                f"tok/s ({b_step:.2f} s/step, run {t_b:.0f} s); ratio {b / a:.2f}",
                flush=True,
            )
    print(f"async_ceiling={statistics.median(ceilings):.2f}")
    print(f"async_speedup={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
