"""Checkpoints: HF weights plus optimizer, scheduler, RNG and loop state, written atomically.

A checkpoint is written to ``step-N.tmp``; when every file is there, a manifest records the
size and sha256 of each (``manifest.json``), everything is fsynced, and the directory is
renamed to ``step-N`` (``atomic.publish_dir``). So a crash or kill -9 mid-write never leaves a
half checkpoint that resume would pick up, and a write that fails (disk full, read-only) raises
``atomic.WriteError`` naming the checkpoint and the reason, with the older checkpoints intact.

Before resuming, :func:`latest_valid` checks the newest checkpoint against its manifest; a
corrupt one is set aside as ``step-N.corrupt`` with a one-line warning and the one before it is
used instead.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ahamoment import atomic


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(
    root: str | Path,
    step: int,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
    files: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write ``root/step-{step}``; keep only the newest ``keep`` checkpoints. ``files``: more
    parts of the checkpoint, each written by ``fn(path)`` inside it before it is sealed (e.g.
    a reference model under ``reference``)."""
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp))
        atomic.fault_point("checkpoint.weights")
        tokenizer.save_pretrained(str(tmp))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            },
            tmp / "trainer.pt",
        )
        atomic.fault_point("checkpoint.trainer")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        for name, write in (files or {}).items():
            write(tmp / name)
        atomic.write_manifest(tmp)
        atomic.fault_point("checkpoint.sealed")
        atomic.publish_dir(tmp, final)
    except Exception as e:  # disk full, read-only, ...: what failed, and what is still there
        why = atomic.why_not_written(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        before = [p.name for p in list_checkpoints(root) if p != final]
        kept = f"the last good checkpoint, {before[-1]}, is intact" if before else "no earlier one"
        raise atomic.WriteError(f"cannot write checkpoint {final}: {why}; {kept}") from e
    atomic.fault_point("checkpoint.published")
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (``step-N.tmp``, ``.old`` and ``.corrupt`` are not)."""
    root = Path(root)
    if not root.exists():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    done = [p for p in done if (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest(root: str | Path) -> Path | None:
    """The newest checkpoint, unchecked (see :func:`latest_valid`)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def latest_valid(root: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint whose files match its manifest. A corrupt one is renamed to
    ``step-N.corrupt`` (kept for inspection, never listed again) with a one-line ``warn``."""
    found = list_checkpoints(root)
    while found:
        path = found.pop()
        if not (path / atomic.MANIFEST).exists():  # written before checksums: taken as is
            return path
        problem = atomic.verify_manifest(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".corrupt")
        try:
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
        except OSError:
            aside = path  # a read-only run: left in place
        fallback = found[-1].name if found else "none left: from step 0"
        warn(
            f"warning: checkpoint {path} is corrupt ({problem}); set aside as {aside.name}, "
            f"resuming from {fallback}"
        )
    return None


def load_trainer_state(path: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore optimizer, scheduler and RNG from ``path``; return the saved loop state."""
    path = Path(path)
    blob = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())
