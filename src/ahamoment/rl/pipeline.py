"""Rollouts ahead of training: step t+1 ... t+K are sampled while step t trains.

``max_staleness`` K = 0 is the synchronous loop: ``get(step)`` samples the step's batch in the
calling thread, from the weights of exactly ``step`` optimizer steps. With K > 0 a background
thread samples the steps in order; it may start step s once the weights of version s - K have
been published (``published(v)``: the trainer has taken v optimizer steps and pushed them), so
no batch is sampled from weights more than K versions older than the ones it trains. The
thread only waits on the rollout servers (``rollout/server_engine.py``), so one trainer
thread and the servers' own threads run side by side.

Every completion carries the version that sampled it. At ``get(s)`` groups sampled from a
version older than s - K (a server that restarted and served stale weights) are dropped and
counted (``groups_stale``); if none is left, the step is sampled again, synchronously. The
loss sees the sampler's log-probs as the behaviour policy (``--tis-cap``, ``rl/tis.py``).

Each step's generator comes from ``step_rng(seed, step)`` as in the synchronous loop, and is
handed to the trainer after sampling; so K = 0 draws exactly what the loop always drew.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ahamoment.rl.rollouts import Rollout


@dataclass
class StepSample:
    """One step's rollouts, as ``sample_groups`` returns them, and how they were made."""

    step: int
    batch: Rollout
    """The groups to train on."""
    sampled: Rollout
    """Everything sampled (rollout metrics)."""
    info: dict[str, Any]
    """Sampling counts (rounds, groups dropped ...), logged with the step."""
    gen: torch.Generator
    """The step's generator, after sampling: the trainer draws its minibatch order from it."""
    seconds: float = 0.0
    """Wall time of the sampling."""
    waited: float = 0.0
    """Time the trainer waited for this batch (0 when it was ready)."""


def versions(batch: Rollout, group_size: int) -> list[int | None]:
    """The weight version of each group (its first completion's; a group is one request)."""
    return [batch.completions[i].version for i in range(0, len(batch), group_size)]


def drop_stale(batch: Rollout, oldest: int, group_size: int) -> tuple[Rollout, int]:
    """``batch`` without the groups sampled from a version older than ``oldest``; and how
    many were dropped. Unstamped groups (in-process engines) are current."""
    keep = [g for g, v in enumerate(versions(batch, group_size)) if v is None or v >= oldest]
    dropped = len(batch) // group_size - len(keep)
    if not dropped:
        return batch, 0
    rows = [g * group_size + j for g in keep for j in range(group_size)]
    return batch.select(rows), dropped


class RolloutPipeline:
    """``get(step)`` for step = start, start + 1, ... in order; see the module docstring.

    ``sample(step)`` draws one step's rollouts (the trainer's closure over the engine, the
    prompt source and the settings); ``group_size`` lets stale groups be dropped.
    """

    def __init__(
        self,
        sample: Callable[[int], StepSample],
        *,
        start: int,
        end: int,
        max_staleness: int,
        group_size: int,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.sample, self.end, self.K, self.G = sample, end, max_staleness, group_size
        self.version = start  # the newest weights published
        self.ready: dict[int, StepSample] = {}
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        if self.K > 0:
            self.thread = threading.Thread(
                target=self._produce, args=(start,), name="aha-rollouts", daemon=True
            )
            self.thread.start()

    def _produce(self, step: int) -> None:
        try:
            while step < self.end:
                oldest = step - self.K
                with self.cond:  # step s waits for version s - K
                    self.cond.wait_for(lambda: self.closed or self.version >= oldest)  # noqa: B023
                    if self.closed:
                        return
                out = self.sample(step)
                with self.cond:
                    self.ready[step] = out
                    self.cond.notify_all()
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the trainer at get()
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def get(self, step: int) -> StepSample:
        """Step ``step``'s rollouts, none from weights older than ``step - K``."""
        t0 = time.time()
        if self.thread is None:
            out = self.sample(step)
        else:
            with self.cond:
                self.cond.wait_for(lambda: step in self.ready or self.error is not None)
                if step not in self.ready:
                    raise self.error  # as the synchronous loop would have raised it
                out = self.ready.pop(step)
        out.waited = time.time() - t0 if self.thread is not None else 0.0
        batch, stale = drop_stale(out.batch, step - self.K, self.G)
        if not len(batch):  # nothing fresh enough: sample it again, now
            out = self.sample(step)
            batch, more = drop_stale(out.batch, step - self.K, self.G)
            stale += more
        out.batch = batch
        lag = [step - v for v in versions(batch, self.G) if v is not None]
        out.info = out.info | {
            "groups_stale": stale,
            "staleness_mean": sum(lag) / len(lag) if lag else 0.0,
        }
        return out

    def published(self, version: int) -> None:
        """The trainer has pushed the weights of ``version`` optimizer steps."""
        with self.cond:
            self.version = version
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
