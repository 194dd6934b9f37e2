"""Files that are whole or absent: atomic writes, checksum manifests, and the fault hook.

A reader never sees a half-written file. :func:`write_text` (and ``write_bytes``,
``write_json``) writes a temporary sibling, fsyncs it, renames it over the target and fsyncs
the directory, so after a kill -9 or a power cut the target holds the old content or the new,
never a mix. :func:`publish_dir` does the same for a directory built under a temporary name:
every file and directory in it is fsynced, then it is renamed into place (an existing one is
moved aside first and removed after). :func:`write_checked` writes one file behind a header
holding its sha256, which :func:`read_checked` verifies. :func:`write_manifest` records the size and sha256 of
every file of a directory; :func:`verify_manifest` names the first one that no longer matches.
An append-only JSONL file is the one exception to whole-or-absent: :func:`cut_torn_tail` cuts
the torn last line a kill mid-append leaves, before anything else is appended to it.

Disk full, a read-only path, a missing permission: :class:`WriteError` (an ``OSError``) says
what could not be written and why, in one line; :func:`describe` turns any ``OSError`` into
such a line, which the `aha` CLI prints instead of a traceback.

**Fault points** (tests only). :func:`fault_point` marks a place where the fault-injection
tests (``tests/test_faults.py``) kill the process on purpose. Unset, it costs one environment
lookup. ``AHAMOMENT_FAULT=NAME@N`` makes the N-th arrival at point NAME (in this process) kill
the process with SIGKILL; ``NAME@N:F`` at a point that is about to write ``data`` first writes
the leading fraction F of it, as a kill in the middle of a write would leave it.
``AHAMOMENT_FAULT=log:FILE`` appends each point's name to FILE instead (a reference run lists
the points a run reaches).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import IO, Any

MANIFEST = "manifest.json"
"""The checksum manifest of a directory: ``{"files": {relative path: {bytes, sha256}}}``."""
FAULT_ENV = "AHAMOMENT_FAULT"


class WriteError(OSError):
    """A file or directory that could not be written; the message says which and why."""


def describe(e: BaseException) -> str:
    """One line for an I/O error: the path and the system's reason (``No space left on
    device``, ``Read-only file system``, ...)."""
    if isinstance(e, OSError) and e.strerror:
        path = f"{e.filename}: " if e.filename else ""
        return f"{path}{e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def why_not_written(e: BaseException, where: str | Path) -> str:
    """``describe(e)``, led by the system's reason when ``e`` hides it (torch and safetensors
    report a full disk as "unexpected pos ..."): a small probe write in ``where`` says whether
    the disk is full or read-only."""
    if isinstance(e, OSError) and e.strerror:
        return describe(e)
    probe = Path(where) / ".ahamoment-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (64 << 10))
            f.flush()
            os.fsync(f.fileno())
    except OSError as p:
        return f"{p.strerror or describe(p)} ({describe(e)})"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return describe(e)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` (one writer per file: a run directory has one; a
    leftover from a kill is overwritten by the next write)."""
    return path.with_name(f".{path.name}.part")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            fault_point(f"write:{path.name}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file meant, not its temporary
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str, encoding: str | None = "utf-8") -> None:
    write_bytes(path, text.encode(encoding or "utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1))


CHECKED = b"ahamoment-sha256:"


def write_checked(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically behind a header holding its sha256 (:func:`read_checked`)."""
    write_bytes(path, CHECKED + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def read_checked(path: str | Path) -> bytes:
    """The data :func:`write_checked` wrote; ``ValueError`` when it is not what was written."""
    raw = Path(path).read_bytes()
    head, _, data = raw.partition(b"\n")
    if not head.startswith(CHECKED):
        raise ValueError(f"{path}: no checksum header")
    if hashlib.sha256(data).hexdigest().encode() != head[len(CHECKED) :]:
        raise ValueError(f"{path}: sha256 mismatch")
    return data


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (``root`` included)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Rename the finished directory ``tmp`` to ``final`` once everything in it is on disk.
    An existing ``final`` is first renamed to ``<final>.old`` and removed afterwards, so a
    kill in between leaves the old directory, never a mix."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    fault_point(f"publish:{final.name}")
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: str | Path) -> None:
    """Record the size and sha256 of every file under ``root`` in ``root/manifest.json``."""
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_json(root / MANIFEST, {"files": files})


def verify_manifest(root: str | Path) -> str | None:
    """None when every file of ``root``'s manifest is there with its size and sha256; else
    what is wrong, e.g. ``model.safetensors: sha256 mismatch``."""
    root = Path(root)
    try:
        files = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} missing or unreadable"
    for name, want in files.items():
        p = root / name
        if not p.is_file():
            return f"{name}: missing"
        if p.stat().st_size != want["bytes"]:
            return f"{name}: {p.stat().st_size} bytes, expected {want['bytes']}"
        if sha256(p) != want["sha256"]:
            return f"{name}: sha256 mismatch"
    return None


def cut_torn_tail(path: str | Path) -> None:
    """Cut a last line that lacks its newline (a write torn by a kill)."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if not size:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            back = min(size, 1 << 16)
            while True:  # find the last newline, reading backwards
                f.seek(size - back)
                chunk = f.read(back)
                at = chunk.rfind(b"\n")
                if at >= 0 or back == size:
                    f.truncate(size - back + at + 1)
                    return
                back = min(size, back * 2)
    except FileNotFoundError:
        return


# --- fault points (tests only; see the module docstring) -------------------------------------
_hits: Counter = Counter()


def fault_point(name: str, f: IO[bytes] | IO[str] | None = None, data: Any = None) -> None:
    """A place where a test may kill this process (``$AHAMOMENT_FAULT``); else a no-op.
    ``f``/``data``: the write about to happen, of which a torn prefix is written first."""
    spec = os.environ.get(FAULT_ENV)
    if spec:
        _fault(spec, name, f, data)


def _fault(spec: str, name: str, f: Any, data: Any) -> None:
    if spec.startswith("log:"):
        with open(spec[4:], "a") as log:
            log.write(name + "\n")
        return
    point, _, rest = spec.rpartition("@")
    if point != name:
        return
    _hits[name] += 1
    nth, _, frac = rest.partition(":")
    if _hits[name] != int(nth):
        return
    if f is not None and data and frac:
        cut = min(len(data) - 1, max(1, int(len(data) * float(frac))))
        f.write(data[:cut])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
