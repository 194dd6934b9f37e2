"""The fault-injection harness of tests/test_faults.py: SIGKILL a stage of the `aha` CLI at
seeded points, resume it, and compare the outcome with an uninterrupted run.

A stage is described by a :class:`Stage`: its command for an output directory, the flags a
rerun adds to resume, and what of its outputs must come out the same (weights, metric rows,
JSON summaries: timing fields left out). :func:`run_stage` then

1. runs it once uninterrupted with ``AHAMOMENT_FAULT=log:FILE``, which lists every fault
   point the run reaches (``ahamoment/atomic.py``: inside checkpoint writes, JSONL appends,
   atomic file writes, directory renames), and times when its final evaluation begins;
2. draws kills with a seeded RNG, each of one kind: ``point`` (the N-th arrival at a named
   point SIGKILLs the process itself; an append is torn at a seeded fraction first),
   ``time`` (SIGKILL from outside at a seeded moment) or ``final`` (SIGKILL from outside at a
   seeded moment of the final evaluation). The first kills of a stage cover, in turn, a
   checkpoint write, the final evaluation and a JSONL append where the stage has them;
3. after each kill checks what a resume would find: no finished checkpoint (``step-N``, a
   pretraining ``resume.pt``) that fails its own checksums (``partial_visible``), and, now and
   then (seeded), corrupts the newest checkpoint on purpose (``injected``) so that the resume
   has to fall back to the one before;
4. reruns the same command with the resume flags; a rerun may be killed again (chains of 1 to
   3 kills), and every ``Resuming <run> from step N`` it prints is checked against the scan
   made before it started: loading a checkpoint that was not whole counts as a corrupt load;
5. when a rerun finishes, compares everything with the uninterrupted run: equal (bit for bit)
   or not, and per JSONL file the rows lost, duplicated, differing and unreadable.

Runs are forked from a server process that has imported the CLI once (multiprocessing's
``forkserver``), so each costs milliseconds to start instead of seconds of imports; the child
runs ``ahamoment.cli.main(argv)`` exactly as the ``aha`` script does, in its own process, with
its own environment, stdout and stderr, and dies by a real SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "recipes" / "pretrain-tiny.yaml")
PRELOAD = ["ahamoment.cli", "ahamoment.stages.r1", "ahamoment.stages.eval", "safetensors.torch"]
APPEND_POINTS = ("runs.append", "traces.rows", "traces.marker")
"""Points about to append to a JSONL file: a kill there tears the write first."""


# --- launching --------------------------------------------------------------------------------
_context: Any = None


def _ctx() -> Any:
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    """The `aha` command in a forked process: its own environment, stdout and stderr."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    from ahamoment import cli

    sys.exit(cli.main(argv))


@dataclass
class Kill:
    kind: str
    """point, time or final (see the module docstring)."""
    spec: str = ""
    """AHAMOMENT_FAULT for a point kill: NAME@N, or NAME@N:F for a torn append."""
    at: float = 0.0
    """Seconds after the start (time) or after the final evaluation began (final)."""


@dataclass
class Outcome:
    killed: bool
    exitcode: int
    log: str
    seconds: float


def launch(argv: list[str], env: dict[str, str], log: Path, kill: Kill | None = None,
           marker: Path | None = None, timeout: float = 600) -> Outcome:  # fmt: skip
    """Run ``aha *argv``; SIGKILL it as ``kill`` says. ``marker``: the path whose appearance
    starts the final evaluation (for ``final`` kills)."""
    env = dict(env)
    if kill is not None and kill.kind == "point":
        env["AHAMOMENT_FAULT"] = kill.spec
    log.write_text("")
    p = _ctx().Process(target=_child, args=(argv, env, str(log)))
    t0 = time.monotonic()
    p.start()
    deadline, seen = None, None
    if kill is not None and kill.kind == "time":
        deadline = t0 + kill.at
    while p.is_alive():
        now = time.monotonic()
        assert now - t0 < timeout, f"aha {' '.join(argv)} ran over {timeout} s"
        if kill is not None and kill.kind == "final" and seen is None and marker.exists():
            seen = now
            deadline = now + kill.at
        if deadline is not None and now >= deadline:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended (and was reaped) since is_alive(): not killed
                pass
            break
        time.sleep(0.005)
    p.join()
    return Outcome(
        p.exitcode == -signal.SIGKILL, p.exitcode, log.read_text(), time.monotonic() - t0
    )


# --- what a stage writes ------------------------------------------------------------------
def tensors(path: Path) -> dict[str, str]:
    """sha256 of each tensor of a safetensors file."""
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in load_file(path).items()}


def json_file(path: Path, drop: tuple[str, ...] = ()) -> Any:
    data = json.loads(path.read_text())
    return _drop(data, drop)


def _drop(data: Any, drop: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        return {k: _drop(v, drop) for k, v in data.items() if k not in drop}
    if isinstance(data, list):
        return [_drop(v, drop) for v in data]
    return data


def jsonl_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@dataclass
class Stage:
    name: str
    argv: Callable[[Path], list[str]]
    """The command, for an output directory."""
    snapshot: Callable[[Path], dict[str, Any]]
    """What must come out the same: weights, JSON summaries (timings dropped)."""
    jsonl: Callable[[Path], dict[str, Path]]
    """The JSONL outputs, by label."""
    drop: tuple[str, ...] = ()
    """Row fields that are timings (left out of the row comparison)."""
    resume: tuple[str, ...] = ()
    """Flags a rerun adds (``--resume`` for the training stages)."""
    final_marker: Callable[[Path], Path] | None = None
    """A path that appears when the final evaluation begins."""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    stage: str
    kills: int = 0
    kinds: Counter = field(default_factory=Counter)
    points: Counter = field(default_factory=Counter)
    misses: int = 0
    """Planned kills that did not land (the run finished first)."""
    chains: int = 0
    bit_exact: int = 0
    lost: int = 0
    duplicated: int = 0
    differing: int = 0
    unreadable: int = 0
    corrupt_loads: int = 0
    partial_visible: int = 0
    injected: int = 0
    fallbacks: int = 0
    """Resumes that warned about a corrupt checkpoint and fell back (one per injection)."""
    resumed_from: Counter = field(default_factory=Counter)
    reference_s: float = 0.0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (
            self.lost or self.duplicated or self.differing or self.unreadable
            or self.corrupt_loads or self.partial_visible or self.problems
            or self.bit_exact != self.chains or self.fallbacks != self.injected
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        for k in ("kinds", "points", "resumed_from"):
            d[k] = dict(d[k])
        return d


# --- checks ---------------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    return [p for p in out.rglob("checkpoints/step-*") if p.is_dir() and p.name[5:].isdigit()]


def whole(ckpt: Path) -> bool:
    """Whether a finished checkpoint matches its manifest (checked here, not by ahamoment)."""
    try:
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, want in files.items():
        p = ckpt / name
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != want["sha256"]:
            return False
    return True


def resume_points(out: Path) -> list[Path]:
    return list(out.parent.glob(out.name + ".tmp/resume.pt")) + list(out.rglob("resume.pt"))


def loadable(path: Path) -> bool:
    """Whether a pretraining resume point is whole: its sha256 header matches, and it loads."""
    import io

    import torch

    head, _, data = path.read_bytes().partition(b"\n")
    if head != b"ahamoment-sha256:" + hashlib.sha256(data).hexdigest().encode():
        return False
    try:
        return "step" in torch.load(io.BytesIO(data), weights_only=False)
    except Exception:  # noqa: BLE001
        return False


def corrupt(path: Path, rng: random.Random) -> None:
    """Flip one byte in the middle third of ``path``."""
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data) // 3, 2 * len(data) // 3)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


RESUMING = re.compile(r"Resuming (\S+) from step (\d+)")


def compare_rows(ref: list[str], got: list[str], drop: tuple[str, ...], rep: Report) -> None:
    def key(line: str) -> str | None:
        try:
            return json.dumps(_drop(json.loads(line), drop), sort_keys=True)
        except ValueError:
            return None

    want = Counter(key(x) for x in ref)
    have = Counter(key(x) for x in got)
    rep.unreadable += have.pop(None, 0)
    for k, n in have.items():
        if k not in want:
            rep.differing += n
        elif n > want[k]:
            rep.duplicated += n - want[k]
    rep.lost += sum(max(0, n - have.get(k, 0)) for k, n in want.items())


# --- the harness ------------------------------------------------------------------------------
def reference(stage: Stage, out: Path, env: dict[str, str]) -> tuple[Counter, float, float]:
    """The uninterrupted run: the fault points it reaches, its wall time, and how long its
    final evaluation took."""
    hits = out.parent / f"{out.name}.hits"
    hits.write_text("")
    marker = stage.final_marker(out) if stage.final_marker else None
    env = {**env, "AHAMOMENT_FAULT": f"log:{hits}"}
    log = out.parent / f"{out.name}.log"
    p = _ctx().Process(target=_child, args=(stage.argv(out), env, str(log)))
    t0 = time.monotonic()
    p.start()
    seen = None
    while p.is_alive():
        if marker is not None and seen is None and marker.exists():
            seen = time.monotonic()
        time.sleep(0.005)
    p.join()
    total = time.monotonic() - t0
    assert p.exitcode == 0, f"reference {stage.name} failed:\n{log.read_text()[-3000:]}"
    final = total - (seen - t0) if seen is not None else 0.0
    return Counter(hits.read_text().split()), total, final


def _plan(rng: random.Random, i: int, hits: Counter, total: float, final: float) -> Kill:
    """Kill ``i`` of a stage: the first ones cover a checkpoint write, the final evaluation
    and an append in turn; the rest are random points and moments."""
    names = sorted(hits)
    ckpt = [n for n in names if n.startswith(("checkpoint.", "write:resume.pt", "publish:"))]
    appends = [n for n in names if n in APPEND_POINTS]
    wanted = [k for k, ok in (("ckpt", ckpt), ("final", final > 0), ("append", appends)) if ok]
    kind = wanted[i] if i < len(wanted) else rng.choice(["point", "point", "time"])
    if kind == "final":
        return Kill("final", at=rng.uniform(0.0, 0.9 * final))
    if kind == "time":
        return Kill("time", at=rng.uniform(0.05, 0.95) * total)
    pool = {"ckpt": ckpt, "append": appends}.get(kind, names)
    name = rng.choice(pool)
    nth = rng.randint(1, max(1, (hits[name] + 1) // 2))  # early enough for a resumed run too
    spec = f"{name}@{nth}"
    if name in APPEND_POINTS:
        spec += f":{rng.uniform(0.05, 0.95):.2f}"
    return Kill("point", spec=spec)


def run_stage(stage: Stage, work: Path, kills: int, seed: int, base_env: dict[str, str],
              inject: float = 0.25, max_attempts: int | None = None) -> Report:  # fmt: skip
    """Kill ``stage`` ``kills`` times (see the module docstring); the report counts what
    happened."""
    rng = random.Random(seed)
    rep = Report(stage.name)
    t_start = time.monotonic()
    env = {**base_env, **stage.env, "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
    env.pop("AHAMOMENT_FAULT", None)
    ref = work / "reference"
    hits, total, final = reference(stage, ref, env)
    rep.reference_s = round(total, 1)
    want = stage.snapshot(ref)
    attempts = 0
    max_attempts = max_attempts or 4 * kills + 4
    while rep.kills < kills and attempts < max_attempts:
        rep.chains += 1
        out = work / f"chain-{rep.chains}"
        argv = stage.argv(out)
        length = rng.choice([1, 1, 2, 3])
        landed, first = 0, True
        injected: set[Path] = set()
        while True:
            attempts += 1
            kill = None
            if landed < length and rep.kills < kills and attempts <= max_attempts:
                kill = _plan(rng, rep.kills, hits, total, final)
            injected = {p for p in injected if p.is_dir() and not whole(p)}  # not rewritten
            valid = {p for p in checkpoint_dirs(out) if whole(p)}
            marker = stage.final_marker(out) if stage.final_marker else None
            log = work / f"chain-{rep.chains}-{attempts}.log"
            res = launch(argv if first else argv + list(stage.resume), env, log, kill, marker)
            first = False
            for run_dir, step in RESUMING.findall(res.log):
                path = Path(run_dir) / "checkpoints" / f"step-{step}"
                rep.resumed_from[f"step-{step}"] += 1
                if path not in valid:
                    rep.corrupt_loads += 1
                    rep.problems.append(f"{log.name}: resumed from {path}, which was not whole")
            rep.fallbacks += res.log.count("is corrupt (") + res.log.count("is unreadable (")
            if res.killed:
                if kill is None:
                    rep.problems.append(f"{log.name}: died by SIGKILL unasked")
                landed += 1
                rep.kills += 1
                rep.kinds[kill.kind] += 1
                rep.points[kill.spec.split("@")[0] if kill.spec else kill.kind] += 1
                # what a resume would find: no finished checkpoint that is not whole
                for p in checkpoint_dirs(out):
                    if p not in injected and not whole(p):
                        rep.partial_visible += 1
                        rep.problems.append(f"{log.name}: {p} is not whole after the kill")
                for p in resume_points(out):
                    if not loadable(p):
                        rep.partial_visible += 1
                        rep.problems.append(f"{log.name}: {p} does not load after the kill")
                if rng.random() < inject:
                    rep.injected += _inject(out, rng, injected)
                continue
            if kill is not None:
                rep.misses += 1
            if res.exitcode != 0:
                rep.problems.append(f"{log.name}: exit {res.exitcode}:\n{res.log[-2000:]}")
                break
            got = stage.snapshot(out)
            if got == want:
                rep.bit_exact += 1
            else:
                diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                rep.problems.append(f"chain {rep.chains}: differs from the reference in {diff}")
            for path in stage.jsonl(ref).values():
                got_path = out / path.relative_to(ref)
                compare_rows(jsonl_lines(path), jsonl_lines(got_path), stage.drop, rep)
            break
    rep.seconds = round(time.monotonic() - t_start, 1)
    return rep


def _inject(out: Path, rng: random.Random, injected: set[Path]) -> int:
    """Corrupt the newest whole checkpoint (or the pretraining resume point) on purpose."""
    ckpts = [
        p
        for p in checkpoint_dirs(out)
        if p not in injected and whole(p) and not (p.parents[2] / "done.json").exists()
    ]  # a finished stage of `aha r1` (its done.json written) is never resumed
    if ckpts:
        newest = max(ckpts, key=lambda p: (p.stat().st_mtime_ns, int(p.name[5:])))
        victim = rng.choice(
            [f for f in ("model.safetensors", "trainer.pt") if (newest / f).exists()]
        )
        corrupt(newest / victim, rng)
        injected.add(newest)
        return 1
    points = [p for p in resume_points(out) if loadable(p)]
    if points:
        corrupt(points[0], rng)
        return 1
    return 0
