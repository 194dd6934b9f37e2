"""Where a stage's per-step metrics go besides ``metrics.jsonl`` (which is always written).

``make_logger(kind, run_dir)`` returns an object with ``.log(step, row)`` and ``.close()``:

- ``jsonl``: nothing extra (the stage writes ``metrics.jsonl`` itself);
- ``tensorboard``: scalars under ``RUN_DIR/tensorboard`` (``pip install 'ahamoment[tensorboard]'``),
  then ``tensorboard --logdir RUN_DIR``;
- ``wandb``: an offline Weights & Biases run under ``RUN_DIR/wandb`` (only when ``wandb`` is
  installed; nothing is uploaded; ``wandb sync`` it later if you want it online).

Only finite numbers are logged; nested values (e.g. ``eval/settings``) and None are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ahamoment.registry import Registry


class MetricsLogger(Protocol):
    def log(self, step: int, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


LOGGERS: Registry[Callable[[Path, dict[str, Any] | None], MetricsLogger]] = Registry("logger")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics row (bools and the step itself excluded)."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class NullLogger:
    def log(self, step: int, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any] | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises this when the tensorboard package is missing
            raise ValueError(
                "--log tensorboard needs the tensorboard package: pip install 'ahamoment[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if config:
            text = "\n".join(f"    {k}: {v}" for k, v in config.items())  # markdown code block
            self.writer.add_text("config", text, 0)

    def log(self, step: int, row: dict[str, Any]) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any] | None = None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ValueError("--log wandb needs the wandb package: pip install wandb") from e
        self.run = wandb.init(
            project="ahamoment",
            name=Path(run_dir).name,
            dir=str(run_dir),
            config=config or {},
            mode="offline",
        )

    def log(self, step: int, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


LOGGERS.add("jsonl", lambda run_dir, config=None: NullLogger())
LOGGERS.add("tensorboard", TensorBoardLogger)
LOGGERS.add("wandb", WandbLogger)


def make_logger(
    kind: str, run_dir: str | Path, config: dict[str, Any] | None = None
) -> MetricsLogger:
    """A logger of the given kind (see the module docstring) writing under ``run_dir``."""
    return LOGGERS.get(kind)(Path(run_dir), config)
