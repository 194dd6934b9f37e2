"""Run directories: where a stage writes its config, its JSONL logs and its checkpoints.

Every stage that writes a run (`aha zero`, `aha sft`, `aha eval`, `aha distill generate`)
goes through :class:`RunDir`: it resolves ``--out`` (default ``runs/<stage>-<timestamp>``;
with ``--resume`` and no ``--out``, the newest such run), refuses to write into a run that
is not its own unless resuming, saves the config, appends JSONL rows (flushed and fsynced, so
a kill loses at most the rows being written; a torn last line is cut before the next append)
and, on resume, cuts the rows logged after the checkpoint resumed from (they are logged again).
:func:`interruptible` turns SIGTERM into Ctrl-C, saves, and exits with status 130.

Every whole file a stage writes into its run directory is written atomically: ``run / name``
is a :class:`RunPath`, whose ``write_text`` and ``write_bytes`` go through ``atomic`` (a
temporary file, fsync, rename), so ``summary.json`` or ``base_eval.json`` is never read half
written after a kill.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ahamoment import atomic
from ahamoment import config as cfglib
from ahamoment.data import read_jsonl
from ahamoment.distributed import Ranks


class RunPath(type(Path())):  # type: ignore[misc]
    """A path under a run directory: ``write_text`` and ``write_bytes`` replace the file
    atomically and durably (``atomic.write_bytes``)."""

    def write_text(self, data: str, encoding: str | None = None, *args: Any, **kw: Any) -> int:
        atomic.write_text(self, data, encoding)
        return len(data)

    def write_bytes(self, data: bytes) -> int:  # type: ignore[override]
        atomic.write_bytes(self, data)
        return len(data)


class RunDir:
    """One run's directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._appended: set[str] = set()  # files whose torn tail has been checked

    @staticmethod
    def resolve(out: str, stage: str, resume: bool = False, ranks: Ranks | None = None) -> RunDir:
        """``out``; else with ``resume`` the newest ``runs/<stage>-*``; else a new
        ``runs/<stage>-<timestamp>`` (rank 0's name on every rank)."""
        if out:
            path = Path(out)
        elif resume:
            runs = sorted(Path("runs").glob(f"{stage}-*"), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise FileNotFoundError(f"--resume: no runs/{stage}-* directory found; pass --out")
            path = runs[-1]
        else:
            path = Path("runs") / f"{stage}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        return RunDir((ranks or Ranks()).broadcast(str(path)))

    def __truediv__(self, name: str) -> RunPath:
        return RunPath(self.path, name)

    def __str__(self) -> str:
        return str(self.path)

    def claim(self, resume: bool, resume_from: Path | None, ranks: Ranks | None = None) -> None:
        """Refuse a directory that holds more than a config unless resuming (every rank checks
        before anything is written), then create it on rank 0."""
        ranks = ranks or Ranks()
        p = self.path
        if resume_from is None and p.exists() and any(_counts(x) for x in p.iterdir()):
            if not resume:
                raise FileExistsError(
                    f"{p} is not empty; pass --resume to continue it, or another --out"
                )
        ranks.barrier()
        if ranks.main:
            p.mkdir(parents=True, exist_ok=True)

    def save_config(self, cfg: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        cfglib.save_yaml(cfg, self.path / "config.yaml")

    def append(self, name: str, *rows: dict[str, Any]) -> None:
        """Append JSON rows to ``name`` in one write, flushed and fsynced. The first append to a
        file in this process cuts a torn last line (a kill mid-write), so new rows never join
        it."""
        path = self.path / name
        if name not in self._appended:
            atomic.cut_torn_tail(path)
            self._appended.add(name)
        data = "".join(json.dumps(r) + "\n" for r in rows)
        with path.open("a") as f:
            atomic.fault_point("runs.append", f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def rows(self, name: str) -> list[dict[str, Any]]:
        """The rows of ``name``; a torn last line (a kill mid-write) is skipped."""
        return [row for _, row in read_jsonl(self.path / name, tolerant=True)]

    def cut_after(self, name: str, step: int) -> None:
        """Drop the rows of ``name`` logged after ``step`` (and a torn last line)."""
        path = self.path / name
        if path.exists():
            keep = [r for r in self.rows(name) if r.get("step", 0) <= step]
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _counts(entry: Path) -> bool:
    """Whether ``entry`` makes a run directory someone's run: anything but its config and the
    temporary file of an atomic write a kill left behind."""
    return entry.name != "config.yaml" and not (
        entry.name.startswith(".") and entry.name.endswith(".part")
    )


# --- reading a run ----------------------------------------------------------------------
def _rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a run's JSONL file; a live run's torn last line is skipped."""
    return [row for _, row in read_jsonl(path, tolerant=True)]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Run:
    """What a finished or live run directory holds (``aha report`` reads these)."""

    path: Path
    label: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    base_eval: dict[str, Any] | None
    summary: dict[str, Any] | None


def load_run(path: str | Path, label: str = "") -> Run:
    """Read a run directory; a live run's torn last line is skipped, a missing file is empty."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory not found: {p}")
    if not (p / "metrics.jsonl").exists() and not (p / "summary.json").exists():
        raise FileNotFoundError(f"{p} holds neither metrics.jsonl nor summary.json: not a run?")
    try:
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    return Run(
        path=p,
        label=label or p.name,
        config=config if isinstance(config, dict) else {},
        metrics=_rows(p / "metrics.jsonl"),
        samples=_rows(p / "samples.jsonl"),
        base_eval=_read_json(p / "base_eval.json"),
        summary=_read_json(p / "summary.json"),
    )


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM inside the block takes effect when the block ends (a second one at
    once): a step's update and its bookkeeping, or its logs and the mark that they are
    written, are never cut in between. Only signals with a Python handler are held (Ctrl-C's
    KeyboardInterrupt, ``interruptible``'s SIGTERM); one ignored or left to the OS stays so.
    In threads other than the main one (where Python runs handlers) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: h for s in (signal.SIGINT, signal.SIGTERM) if callable(h := signal.getsignal(s))}

    def hold(signum: int, frame: Any) -> None:
        if held:  # the second: no more waiting
            old[signum](signum, frame)
        held.append(signum)

    for s in old:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if held:  # as the handler would have, now
        old[held[0]](held[0], None)


@contextmanager
def interruptible(on_interrupt: Callable[[], None] | None = None) -> Iterator[None]:
    """Ctrl-C or SIGTERM (``kill``) inside the block: run ``on_interrupt`` (save, say how to
    resume), then exit with status 130."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, raise_interrupt) if main else None
    try:
        yield
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        raise SystemExit(130) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
