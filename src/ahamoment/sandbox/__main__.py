"""``python -m ahamoment.sandbox --code program.py --tests tests.jsonl --timeout 2``

Prints exactly one JSON line, ``{"passed": P, "total": T, "status": "...", "reward": R}``, and
exits 0 whatever the program did. Bad input (an unreadable file, a test row that is not JSON
or not gradable) is a one-line error naming the file and line, exit status 2. ``--explain``
adds the detail, the program's output and the isolation this machine gives, on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from ahamoment.sandbox.cases import NotGradable, load_tests
from ahamoment.sandbox.harness import STATUSES, Limits, isolation, run_tests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ahamoment.sandbox",
        description="Run an untrusted program against test cases in the ahamoment sandbox.",
        epilog="statuses: " + "; ".join(f"{k}: {v}" for k, v in STATUSES.items()),
    )
    p.add_argument("--code", help="the program, a Python file")
    p.add_argument(
        "--tests",
        help='JSONL: {"call": "add(2, 3)", "expected": 5} or {"assert": "assert add(2, 3) == 5"}',
    )
    p.add_argument("--timeout", type=float, default=2.0, help="wall-clock seconds for the run")
    p.add_argument("--memory-mb", type=int, default=Limits.memory_mb, help="address space, MiB")
    p.add_argument("--explain", action="store_true", help="detail and output on stderr")
    p.add_argument(
        "--isolation", action="store_true", help="print what this machine isolates, and exit"
    )
    args = p.parse_args(argv)
    if args.isolation:
        print(json.dumps(isolation()))
        return 0
    if not args.code or not args.tests:
        p.error("--code and --tests are required (or --isolation)")
    if not args.timeout > 0:
        p.error(f"--timeout must be positive, got {args.timeout}")
    try:
        limits = Limits(memory_mb=args.memory_mb)
    except ValueError as e:
        p.error(str(e))
    try:
        with open(args.code, "rb") as f:
            code = f.read().decode("utf-8", "replace")
    except OSError as e:
        print(f"error: {args.code}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        tests = load_tests(args.tests)
    except OSError as e:
        print(f"error: {args.tests}: {e.strerror}", file=sys.stderr)
        return 2
    except NotGradable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = run_tests(code, tests, timeout=args.timeout, limits=limits)
    line = {"passed": r.passed, "total": r.total, "status": r.status, "reward": r.reward()}
    print(json.dumps(line), flush=True)
    if args.explain:
        print(f"detail: {r.detail}\nisolation: {json.dumps(r.isolation)}", file=sys.stderr)
        print(f"output ({len(r.output)} chars):\n{r.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
