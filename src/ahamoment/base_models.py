"""Base models: a user's model directory, or the embedded default that `aha pretrain` builds.

Every stage that takes ``--model`` resolves it here. An empty ``--model`` means the embedded
base for the task (or for ``--pretrain-recipe``), found in this order:

1. **shipped** with the package (``ahamoment/shipped/<cache key>/``): built once by the
   project's own `aha pretrain`, so every user starts from the same weights, whatever their
   CPU rounds like. Its ``manifest.json`` records the command, seed, thread count, corpus
   version, cache key, a hash of the corpus and the sha256 of every file, checked on load;
2. **cached** under ``$AHAMOMENT_CACHE/models/<cache key>`` by an earlier build;
3. **built** now by the pretrain stage, then cached, under a file lock: a second process that
   asks for the same model waits and reuses the first one's. This is the one component that
   runs a stage: building a missing base model is pretraining.

The cache key (``PretrainConfig.cache_key``) hashes the corpus generator's version and config,
the model shape and the training budget, so a changed corpus never reuses a stale model;
``tests/test_base_models.py`` fails when a shipped model's key or corpus no longer matches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

if TYPE_CHECKING:
    from ahamoment.stages.pretrain import PretrainConfig

PRETRAIN_META = "ahamoment_pretrain.json"
"""What `aha pretrain` writes beside the weights: its config, corpus statistics, timings."""
MANIFEST = "manifest.json"
"""What makes a built model shippable: how to rebuild it, and the hash of every file."""
SHIPPED = Path(__file__).parent / "shipped"
CORPUS_PREFIX = 2000
"""Documents of the corpus hashed into the manifest (the corpus is drawn from one seeded
stream, so its first documents are the same whatever its length)."""


def ensure_base_model(
    model: str, task: str, recipe: str = "", threads: int = 0, console: Console | None = None
) -> Path:
    """``model`` if given; else the embedded base for ``task`` (or the model of the
    `aha pretrain` YAML ``recipe``, for its own task where it names one): shipped, cached, or
    built now (see the module docstring)."""
    if model:
        return Path(model)
    from ahamoment import config as cfglib
    from ahamoment.stages.pretrain import PretrainConfig

    # a recipe's own task wins: a base may be pretrained on other problems than the run's
    # (zero-aha.yaml evaluates on countdown_tinyzero_100 a base built on countdown_levels)
    if recipe and "task" in cfglib.read_recipe(recipe):
        return embedded_base(cfglib.build(PretrainConfig, recipe, threads=threads), console)
    return embedded_base(
        cfglib.build(PretrainConfig, recipe or None, task=task, threads=threads), console
    )


def embedded_base(cfg: PretrainConfig, console: Console | None = None) -> Path:
    """The model `aha pretrain` builds from ``cfg``: shipped, cached, or built now."""
    from ahamoment.stages.pretrain import pretrain

    shipped = shipped_model(cfg.cache_key())
    if shipped is not None and not cfg.out:
        return shipped
    out = cfg.output_dir()
    # one build per key: a second process waits here, then finds the first one's model
    with build_lock(out):
        if not (out / "config.json").exists() and console is not None:
            console.print(
                f"[bold]No embedded base model for {cfg.task!r} yet: building it (aha pretrain)."
            )
        return pretrain(cfg, console)


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``<out>.lock`` (flock: released when the process dies, so a killed
    build never leaves it held)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shipped_model(key: str) -> Path | None:
    """The shipped model of cache key ``key``, its files checked against its manifest; None
    when none is shipped under that key."""
    path = SHIPPED / key
    if not (path / MANIFEST).exists():
        return None
    check_files(path)
    return path


def shipped_keys() -> list[str]:
    return sorted(p.parent.name for p in SHIPPED.glob(f"*/{MANIFEST}"))


def file_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file of a model directory but the manifest."""
    d = Path(model_dir)
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def check_files(model_dir: str | Path) -> None:
    """Raise when a file of ``model_dir`` is missing or differs from its manifest."""
    d = Path(model_dir)
    want = json.loads((d / MANIFEST).read_text())["files"]
    got = file_hashes(d)
    bad = sorted(k for k in want if got.get(k) != want[k]) + sorted(set(got) - set(want))
    if bad:
        raise ValueError(f"{d}: {', '.join(bad)} differ from {MANIFEST}; reinstall ahamoment")


def corpus_hash(cfg: PretrainConfig) -> str:
    """sha256 of the first ``CORPUS_PREFIX`` documents of ``cfg``'s corpus."""
    from ahamoment.stages.pretrain import make_corpus

    docs, _ = make_corpus(replace(cfg, corpus_docs=min(cfg.corpus_docs, CORPUS_PREFIX)))
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()


def pretrain_command(cfg: PretrainConfig) -> str:
    """The `aha pretrain` command line that builds ``cfg``'s model (flags for the fields that
    differ from the defaults)."""
    from ahamoment.stages.pretrain import PretrainConfig

    default, flags = PretrainConfig(), ["aha pretrain"]
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), f.name.replace("_", "-")
        if f.name in ("out", "force", "save_every") or value == getattr(default, f.name):
            continue
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags.append(f"--{flag} {value}")
    return " ".join(flags)


def write_manifest(model_dir: str | Path, cfg: PretrainConfig) -> dict[str, Any]:
    """Write ``manifest.json`` beside a model `aha pretrain` built from ``cfg``."""
    from ahamoment.stages.pretrain import CORPUS_VERSION

    d = Path(model_dir)
    threads = cfg.threads or torch.get_num_threads()
    manifest = {
        "command": pretrain_command(replace(cfg, threads=threads)),
        "seed": cfg.seed,
        "threads": threads,
        "corpus_version": CORPUS_VERSION,
        "cache_key": cfg.cache_key(),
        "corpus_sha256": corpus_hash(cfg),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "force")},
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "files": file_hashes(d),
    }
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def compare_with_shipped(model_dir: str | Path, key: str) -> str | None:
    """How a freshly built model compares with the shipped one of the same key (None when
    none is shipped): the weights are the same bit for bit, or they differ in float rounding."""
    shipped = SHIPPED / key
    if not (shipped / MANIFEST).exists():
        return None
    want = json.loads((shipped / MANIFEST).read_text())["files"].get("model.safetensors")
    got = file_hashes(model_dir).get("model.safetensors")
    if got == want:
        return f"the same weights, bit for bit, as the shipped base {shipped}"
    return (
        f"other weights than the shipped base {shipped} (float rounding differs between CPUs "
        "and thread counts); stages keep using the shipped one unless given --model DIR"
    )


def pretrain_meta(model_dir: str | Path) -> dict[str, Any]:
    """What `aha pretrain` recorded about a base model ({} for any other model)."""
    meta = Path(model_dir) / PRETRAIN_META
    return json.loads(meta.read_text()) if meta.exists() else {}


def reversed_digits(model_dir: str | Path) -> bool:
    """Whether the model writes its reasoning's numbers least-significant digit first (read
    by ``metrics.step_accuracy``); a model `aha pretrain` did not build is taken as standard."""
    return bool(pretrain_meta(model_dir).get("config", {}).get("reversed_digits"))
