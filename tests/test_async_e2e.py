"""Asynchronous RL end to end through the real CLI: `aha launch`, and a rollout server killed
with SIGKILL in the middle of an `aha zero --rollout-server` run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_zero_e2e import ROOT, ZERO_TINY, aha
from tests_support import default_sigint, free_port, wait_healthy

KEY = "e2e-weights-key"
ASYNC = ["--max-staleness", "1", "--tis-cap", "2"]


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _serve(model: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ahamoment.cli", "serve", "--model", str(model)]
    cmd += ["--port", str(port), "--threads", "1", "--max-n", "4", "--weights-key", KEY]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_launch_runs_servers_and_trainer_and_stops_the_servers(tiny_base, tmp_path):
    run, port = tmp_path / "run", free_port()
    zero = " ".join([*ZERO_TINY, *ASYNC, "--model", str(tiny_base), "--out", str(run)])
    res = aha("launch", "--servers", "1", "--port", str(port), "--zero-args", zero)
    assert f"http://127.0.0.1:{port}" in res.stdout and "Held-out 6 problems" in res.stdout
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["servers_up"] == 1 and r["groups_stale"] == 0 for r in rows)
    # K = 1: from the second step on, each batch was sampled one version behind the trainer
    assert all(r["staleness_mean"] <= 1 for r in rows) and rows[-1]["staleness_mean"] == 1
    # pushes are counted when a batch is sampled: the start's (version 0), then one after each
    # step; the last batch (K = 1) waits only for version 2, so at least 3 are in the rows
    assert sum(r["weight_pushes"] for r in rows) >= 3
    time.sleep(1)
    with pytest.raises(OSError):  # the server was stopped with the trainer
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)


@pytest.mark.slow
def test_a_rollout_server_killed_mid_run_is_survived_and_counted(tiny_base, tmp_path):
    ports = [free_port(), free_port()]
    servers = [_serve(tiny_base, p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url, proc in zip(urls, servers):
            wait_healthy(url, proc, 120)
        run = tmp_path / "run"
        cmd = [sys.executable, "-m", "ahamoment.cli", "zero", "--model", str(tiny_base)]
        cmd += [*ZERO_TINY, *ASYNC, "--steps", "24", "--out", str(run)]
        cmd += ["--rollout-server", ",".join(urls), "--weights-key", KEY]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        trainer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(_rows(run)) < 2:  # mid-run: kill one server without warning
            assert trainer.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        servers[1].send_signal(signal.SIGKILL)
        out, _ = trainer.communicate(timeout=300)
        assert trainer.returncode == 0, out
    finally:
        for proc in servers:
            proc.kill()
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 25))  # the run finished
    assert sum(r["servers_lost"] for r in rows) == 1  # the loss was seen and counted
    assert rows[-1]["servers_up"] == 1
    # groups in flight at the kill were sent again whole (counted; none trained half-received)
    assert all(r["groups_trained"] * 4 == 8 for r in rows)
    assert (run / "summary.json").exists()


@pytest.mark.slow
def test_ctrl_c_on_launch_saves_the_trainer_stops_the_servers_and_resumes(tiny_base, tmp_path):
    run, port = tmp_path / "run", free_port()
    base_args = [*ZERO_TINY, *ASYNC, "--model", str(tiny_base), "--out", str(run)]
    # long enough that it cannot end between the third row and the signal (~0.1 s a step)
    zero = " ".join([*base_args, "--steps", "200", "--save-every", "0"])
    cmd = [sys.executable, "-m", "ahamoment.cli", "launch", "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a terminal's Ctrl-C reaches the whole foreground group: launch, servers and trainer
    proc = subprocess.Popen(
        [*cmd, "--zero-args", zero], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while len(_rows(run)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    saved = sorted((run / "checkpoints").iterdir())
    assert saved and "Interrupted: saved step" in out
    step = int(saved[-1].name.split("-")[1])
    assert step >= 3
    with pytest.raises(OSError):  # the server went with it
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
    # the same command with --resume continues from the saved step to the end
    resume = " ".join([*base_args, "--steps", "200", "--save-every", "0", "--resume"])
    res = aha("launch", "--port", str(port), "--zero-args", resume)
    squeezed = "".join(res.stdout.split())  # rich wraps the long path
    assert f"Resuming{run}fromstep{step}" in squeezed
    assert [r["step"] for r in _rows(run)] == list(range(1, 201))
