"""`aha launch`: rollout servers and the `aha zero` trainer, started together on this machine.

Starts ``servers`` `aha serve` processes on ports ``port``, ``port + 1``, ... (each with
``server_threads`` torch threads, the policy's base model and a fresh weights key), waits until
each answers, then runs `aha zero --rollout-server URLS` with ``trainer_threads`` threads (or
``trainers`` processes under `torchrun`) in the foreground. The trainer pushes its weights to
the servers after every step, and with ``--max-staleness K`` (in ``zero_args``) samples up to K
steps ahead (``rl/pipeline.py``). Ctrl-C (or SIGTERM) stops the trainer once, which saves a
checkpoint; `--resume` with the run's `--out` in ``zero_args`` continues it. With a fixed KL reference the servers hold it too
(``aha serve --reference``) and return its log-probs with each completion, so the trainer does
no reference forward. When the trainer ends, or on Ctrl-C, the servers are stopped.

    aha launch --servers 1 --server-threads 1 --trainer-threads 1 \\
        --zero-args "--recipe recipes/zero-countdown.yaml --max-staleness 1 --tis-cap 2"

Across machines nothing is scheduled for you: start `aha serve --model BASE --weights-key KEY`
(or a vLLM server) on each rollout machine, then the trainer with ``--rollout-server
URL1,URL2`` (under `torchrun` for several trainer processes); ``remote`` adds such servers to
the local ones here.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from rich.console import Console

from ahamoment.base_models import ensure_base_model
from ahamoment.runs import raise_interrupt
from ahamoment.server_protocol import WEIGHTS_KEY_ENV


@dataclass
class LaunchConfig:
    zero_args: str = "--max-staleness 1 --tis-cap 2"
    """Flags of the `aha zero` trainer (a --recipe among them), as one string; --rollout-server is added, and --model (the servers load the same base)."""
    servers: int = 1
    """Rollout servers to start on this machine (`aha serve` processes)."""
    server_threads: int = 1
    """torch threads of each local rollout server."""
    trainer_threads: int = 1
    """torch threads of each trainer process."""
    trainers: int = 1
    """Trainer processes (more than 1: under `torchrun --nproc-per-node N`)."""
    port: int = 8100
    """Port of the first local server; server i listens on port + i."""
    host: str = "127.0.0.1"
    """Address the local servers listen on."""
    remote: str = ""
    """Comma-separated URLs of rollout servers already running elsewhere (`aha serve --weights-key KEY`, same base model), used besides the local ones; give their key as $AHA_WEIGHTS_KEY."""
    server_args: str = ""
    """Extra flags for every local `aha serve` (e.g. --engine torch-eager)."""
    start_timeout: float = 300.0
    """Seconds to wait for a server to answer before giving up."""

    def __post_init__(self) -> None:
        if self.servers < 0 or self.trainers < 1:
            raise ValueError("servers must be >= 0 and trainers >= 1")
        if self.servers == 0 and not self.remote:
            raise ValueError("no rollout server: set --servers N or --remote URL")
        if min(self.server_threads, self.trainer_threads) < 1:
            raise ValueError("server_threads and trainer_threads must be >= 1")
        if not 0 < self.port < 65536 - self.servers:
            raise ValueError(f"port must leave room for {self.servers} servers, got {self.port}")
        if "--rollout-server" in shlex.split(self.zero_args):
            raise ValueError("zero_args must not set --rollout-server: aha launch sets it")


def trainer_config(cfg: LaunchConfig):
    """The trainer's `ZeroConfig` as `aha zero` would build it from ``zero_args`` (so a bad
    flag fails here, before any server starts)."""
    from ahamoment.cli import stage_config

    # validated with a placeholder server, as `aha zero --rollout-server` will be
    return stage_config("zero", shlex.split(cfg.zero_args), rollout_server="http://placeholder")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll ``url``/health until it answers; ConnectionError if the server process ``proc``
    exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return
        except OSError:
            if proc.poll() is not None:
                msg = f"the rollout server for {url} exited ({proc.returncode})"
                raise ConnectionError(msg) from None
            if time.monotonic() > deadline:
                msg = f"the rollout server {url} did not answer in {timeout:.0f} s"
                raise ConnectionError(msg) from None
            time.sleep(0.25)


def launch(cfg: LaunchConfig, console: Console | None = None) -> None:
    console = console or Console()
    zcfg = trainer_config(cfg)
    base = ensure_base_model(
        zcfg.model, zcfg.task, zcfg.pretrain_recipe, cfg.trainer_threads, console
    )
    key = os.environ.get(WEIGHTS_KEY_ENV) or secrets.token_hex(16)
    signal.signal(signal.SIGTERM, raise_interrupt)  # kill: the same clean stop as Ctrl-C
    env = os.environ | {WEIGHTS_KEY_ENV: key, "OMP_NUM_THREADS": str(cfg.server_threads)}
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    try:
        for i in range(cfg.servers):
            port = cfg.port + i
            cmd = [
                sys.executable, "-m", "ahamoment.cli", "serve", "--model", str(base),
                "--host", cfg.host, "--port", str(port), "--threads", str(cfg.server_threads),
                "--max-n", str(zcfg.group_size), "--max-tokens", str(zcfg.max_new_tokens),
                "--max-batch-rows", str(max(64, zcfg.prompts_per_step * zcfg.group_size)),
                "--max-inflight", "1024", "--batch-wait-ms", "20",
                # a fixed KL reference: the servers compute its log-probs (server.py)
                *(["--reference"] if zcfg.kl_coef > 0 and not zcfg.ref_refresh else []),
                *shlex.split(cfg.server_args),
            ]  # fmt: skip
            # own sessions: a terminal's Ctrl-C reaches launch alone, which stops each child once
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
            )
            urls.append(f"http://{cfg.host}:{port}")
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc, cfg.start_timeout)
        urls += [u.strip() for u in cfg.remote.split(",") if u.strip()]
        console.print(f"rollout servers: {', '.join(urls)}")
        zero = ["-m", "ahamoment.cli", "zero", *shlex.split(cfg.zero_args)]
        zero += ["--model", str(base), "--rollout-server", ",".join(urls)]
        zero += ["--threads", str(cfg.trainer_threads)]
        if cfg.trainers > 1:
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*head, f"--nproc-per-node={cfg.trainers}", *zero]
        else:
            cmd = [sys.executable, *zero]
        trainer_env = env | {"OMP_NUM_THREADS": str(cfg.trainer_threads)}
        trainer = subprocess.Popen(cmd, env=trainer_env, start_new_session=True)
        try:
            code = trainer.wait()
        except KeyboardInterrupt:  # one signal: the trainer saves a checkpoint and exits
            # SIGTERM, which `aha zero` always handles; SIGINT may be ignored in a child that
            # a shell started in the background
            trainer.send_signal(signal.SIGTERM)
            while trainer.poll() is None:
                try:
                    trainer.wait()
                except KeyboardInterrupt:  # a second Ctrl-C must not cut the save short
                    continue
            console.print(
                "[yellow]Interrupted.[/] Resume: the same `aha launch` with --resume (and the "
                "run's --out) in --zero-args"
            )
            raise SystemExit(130) from None
        if code:
            raise SystemExit(code)  # the trainer printed why
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # uvicorn: finish requests, then stop
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("launch", argv)


if __name__ == "__main__":
    raise SystemExit(main())
