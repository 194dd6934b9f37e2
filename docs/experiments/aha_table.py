"""Markdown table of runs for docs/experiments/aha-moment.md: step 0 (base_eval.json) against the
last held-out evaluation logged (summary.json when the run finished, else the last periodic one).

    python docs/experiments/aha_table.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys

from ahamoment.runs import load_run


def pooled(by_size: dict | None) -> float | None:
    """pass@1 over the whole real sample from its 3- and 4-number subsets (weighted by n)."""
    if not by_size:
        return None
    parts = by_size.values()
    return sum(d["pass1"] * d["n"] for d in parts) / sum(d["n"] for d in parts)


KEYS = ("pass1", "mean_len", "reflection_rate", "self_correction_rate", "step_accuracy")


def main(paths: list[str]) -> None:
    head = ["run", "steps"] + [f"{k} 0 → end" for k in KEYS] + ["real pass@1 0 → end"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in paths:
        run = load_run(p)
        evals = [r for r in run.metrics if "eval/pass1" in r]
        if run.summary:  # final evaluation: compare with the base on the same problems
            base = (run.base_eval or {}).get("heldout", {})
            end, steps = run.summary["trained"], run.summary.get("steps")
        elif evals:  # the last periodic evaluation: the base on the periodic problems
            base = (run.base_eval or {}).get("periodic") or {}
            end, steps = {k: evals[-1].get(f"eval/{k}") for k in KEYS}, evals[-1]["step"]
        else:
            base, end, steps = {}, {}, 0
        cells = [run.label, str(steps)]
        for k in KEYS:
            a, b = base.get(k), end.get(k)
            cells.append(f"{a:.3f} → {b:.3f}" if a is not None and b is not None else "–")
        real = (run.summary or {}).get("real_countdown") or {}
        rb = pooled((run.base_eval or {}).get("real"))
        rt = pooled(real.get("trained"))
        cells.append(
            f"{rb:.3f} → {rt:.3f}"
            if rb is not None and rt is not None
            else (f"{rb:.3f} → –" if rb is not None else "–")
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
