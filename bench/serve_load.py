"""Load test of `aha serve`: 1,000 chat requests at concurrency 16 on loopback.

Starts ``aha serve`` in a subprocess (a tiny random model built here, or ``--model DIR``, or
``--default`` for the embedded default model), sends the requests from 16 client threads
(every 4th one streamed), and reports requests per second, p50/p99 latency and the error
count, which must be 0 (the exit status is 1 otherwise).

    python bench/serve_load.py                       # tiny model, max_tokens 16
    python bench/serve_load.py --default --requests 1000 --concurrency 16
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KEY = "bench-key"


def tiny_model_dir(root: Path) -> Path:
    """A random tiny Llama with the project's tokenizer (as in tests/conftest.py)."""
    from ahamoment.models import (
        build_tokenizer,
        new_model,
        r1_zero_prompt,
        save_model,
        tiny_llama_config,
    )
    from ahamoment.tasks import get_task
    from ahamoment.tasks.base import TraceNoise

    task, rng = get_task("countdown"), random.Random(0)
    docs = []
    for _ in range(400):
        p = task.sample(rng)
        docs.append(r1_zero_prompt(p.question) + task.trace(p, rng, TraceNoise()))
    tok = build_tokenizer(docs, vocab_size=300)
    cfg = tiny_llama_config(tok, hidden=32, layers=2, heads=2, intermediate=64, max_positions=512)
    path = root / "tiny"
    save_model(new_model(cfg, seed=0), tok, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model directory (default: a tiny random one)")
    ap.add_argument("--default", action="store_true", help="serve the embedded default model")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model_args: list[str] = []
    if args.model:
        model_args = ["--model", args.model]
    elif not args.default:
        model_args = ["--model", str(tiny_model_dir(Path(tmp.name)))]
    port = free_port()
    cmd = [sys.executable, "-m", "ahamoment.cli", "serve", *model_args, "--port", str(port)]
    cmd += ["--threads", str(args.threads), "--max-tokens", str(args.max_tokens)]
    cmd += ["--max-inflight", str(4 * args.concurrency), "--name", "bench"]
    env = os.environ | {"AHA_API_KEY": KEY}
    log = open(Path(tmp.name) / "server.log", "w+")  # a file, not a pipe nobody drains
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600  # --default may build the model first
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    print(log.read(), file=sys.stderr)
                    raise SystemExit("aha serve did not start") from None
                time.sleep(0.2)

        local = threading.local()
        question = "Using the numbers [{}, {}, {}], make {}."

        def one(i: int) -> tuple[float, bool]:
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            rng = random.Random(i)
            nums = [rng.randint(1, 99) for _ in range(4)]
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": question.format(*nums)}],
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "stream": i % 4 == 0,
            }
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
            t0 = time.perf_counter()
            try:
                local.conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
                resp = local.conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and (
                    data.rstrip().endswith(b"data: [DONE]") if body["stream"] else b"usage" in data
                )
            except (OSError, http.client.HTTPException):
                local.conn.close()
                del local.conn
                ok = False
            return time.perf_counter() - t0, ok

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        tmp.cleanup()

    lat = sorted(r[0] for r in results)
    errors = sum(not r[1] for r in results)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(
        f"aha serve load: {args.requests} requests, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, model {args.model or ('default' if args.default else 'tiny')}"
    )
    print(
        f"{args.requests / wall:.1f} req/s   p50 {1000 * statistics.median(lat):.0f} ms   "
        f"p99 {1000 * p99:.0f} ms   errors {errors}   (server exit {server.returncode})"
    )
    print(f"errors={errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
