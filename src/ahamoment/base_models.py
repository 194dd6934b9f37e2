"""Base models: a user's model directory, or the embedded default that `aha pretrain` builds.

Every stage that takes ``--model`` resolves it here. An empty ``--model`` means the embedded
default for the task, built by the pretrain stage on first use and cached under its key
(``PretrainConfig.cache_key``); ``--pretrain-recipe`` names another pretraining recipe.
This is the one component that runs a stage: building a missing base model is pretraining.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

PRETRAIN_META = "ahamoment_pretrain.json"
"""What `aha pretrain` writes beside the weights: its config, corpus statistics, timings."""


def ensure_base_model(
    model: str, task: str, recipe: str = "", threads: int = 0, console: Console | None = None
) -> Path:
    """``model`` if given; else the embedded default for ``task`` (or the model of the
    `aha pretrain` YAML ``recipe``), built on first use."""
    if model:
        return Path(model)
    from ahamoment import config as cfglib
    from ahamoment.stages.pretrain import PretrainConfig, pretrain

    cfg = cfglib.build(PretrainConfig, recipe or None, task=task, threads=threads)
    if not (cfg.output_dir() / "config.json").exists() and console is not None:
        console.print(f"[bold]No embedded base model for {task!r} yet: building it (aha pretrain).")
    return pretrain(cfg, console)


def pretrain_meta(model_dir: str | Path) -> dict[str, Any]:
    """What `aha pretrain` recorded about a base model ({} for any other model)."""
    meta = Path(model_dir) / PRETRAIN_META
    return json.loads(meta.read_text()) if meta.exists() else {}


def reversed_digits(model_dir: str | Path) -> bool:
    """Whether the model writes its reasoning's numbers least-significant digit first (read
    by ``metrics.step_accuracy``); a model `aha pretrain` did not build is taken as standard."""
    return bool(pretrain_meta(model_dir).get("config", {}).get("reversed_digits"))
