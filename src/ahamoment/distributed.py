"""Several processes on one run: the helpers `aha zero` and `aha sft` use under a launcher.

`accelerate launch` or `torchrun` starts W processes; `Accelerator()` joins them into one
process group (gloo on CPU, NCCL on GPU) and `prepare` wraps the model in DDP (or FSDP /
DeepSpeed, from the accelerate config). Nothing here schedules or launches anything.

The rules the stages follow, so that W processes compute what one process would:

- **Work is split in contiguous, deterministic pieces** (:meth:`Ranks.piece`): every rank
  knows every other rank's piece from global information alone, so no counts are exchanged.
- **A step's whole batch is known on every rank.** `aha zero` gathers the scored rollouts
  (token ids, rewards) after each sampling round, so advantages, the loss normalisers
  (:class:`~ahamoment.rl.losses.Norm`: sequence and token counts of the whole step batch) and
  the rollout metrics are computed from the same global data everywhere; `aha sft` draws each
  step's examples from a seeded order shared by all ranks.
- **Gradients are sums.** Each rank's loss is its share of the global loss (global
  denominators), multiplied by W because DDP, FSDP and DeepSpeed *average* gradients over
  ranks; the averaged gradient is then the gradient of the global loss.
- **Only rank 0 writes** logs, samples, checkpoints and the final model, and evaluates.
  Checkpoints hold plain HF weights and a replicated optimizer state, so they resume on any
  process count (not under FSDP/DeepSpeed, whose optimizer state is sharded).
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torchdist
from accelerate import Accelerator

from ahamoment.models import set_threads

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> Ranks:
        """From the default process group, if one is initialised (accelerate does it)."""
        if torchdist.is_available() and torchdist.is_initialized():
            return Ranks(torchdist.get_rank(), torchdist.get_world_size())
        return Ranks()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def piece(self, n: int, rank: int | None = None) -> range:
        """The contiguous share of ``n`` items of ``rank`` (default: this one); the first
        ``n % world`` ranks get one more. Every rank can compute every other rank's piece."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        start = r * base + min(r, extra)
        return range(start, start + base + (1 if r < extra else 0))

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order (pickled: token ids, rewards, small tensors)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torchdist.all_gather_object(out, obj)
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks, added in rank order (the same result on every rank)."""
        if self.world == 1:
            return [float(v) for v in values]
        rows = self.gather([float(v) for v in values])
        return [sum(col) for col in zip(*rows)]

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torchdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torchdist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. builds a cached model); the others then reuse it."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers such as (base seed, step, round, block); stable across
    runs and machines (unlike ``hash``), and unrelated for neighbouring inputs."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by :func:`mix_seed` of ``parts``."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def seed_blocks(n_prompts: int, block: int) -> list[range]:
    """Prompt index ranges of the sampling seed blocks: ``block`` consecutive prompts each."""
    if block < 1 or n_prompts % block:
        raise ValueError(f"seed block ({block}) must divide the prompts per step ({n_prompts})")
    return [range(s, s + block) for s in range(0, n_prompts, block)]


def make_accelerator(device: str, bf16: bool) -> Accelerator:
    """The run's accelerator; under `accelerate launch` / `torchrun` it joins the process group.

    Every forward through the DDP wrapper is a collective (DDP syncs buffers there), so the
    stages make the same number of them on every rank; no-grad forwards (sampling, old and
    reference log-probs) use the bare module and are rank-local.
    """
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no")
    if accelerator.device.type == "cpu":
        deterministic_cpu()
    if accelerator.num_processes > 1 and not _CLOSING:
        # leave the process group before interpreter teardown: gloo's threads otherwise
        # sometimes abort the process at exit ("terminate called without an active exception")
        atexit.register(_close)
        _CLOSING.append(True)
    return accelerator


_CLOSING: list[bool] = []


def deterministic_cpu() -> None:
    """torch's deterministic algorithms, so that the same seed and thread count give the same
    run bit for bit: with two threads, gradients otherwise differ between two backward passes
    over the same batch, and RL amplifies the difference (docs/results/performance.md). CPU
    only (GPUs need CUBLAS_WORKSPACE_CONFIG and may slow down). ``warn_only``: an op with no
    deterministic kernel warns instead of failing the run. Deterministic mode would also fill
    every ``torch.empty`` with NaN; that is turned off, because it makes the sampler's whole KV
    cache resident, and our code never reads memory it did not write (tests/test_engines.py
    fills it with NaN and checks)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def _close() -> None:
    if torchdist.is_initialized():
        torchdist.barrier()
        torchdist.destroy_process_group()


def share_threads(threads: int) -> int:
    """``threads``, or this process's share of the cores when 0 (W local processes split them)."""
    if threads:
        return set_threads(threads)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return set_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local)))
