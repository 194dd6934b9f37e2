"""What every training stage does around its loop: set up, resume, checkpoint, save the result.

`aha zero` and `aha sft` start the same way (:func:`start`): torch's global generator seeded
from ``--seed`` (LoRA initialises its adapters from it, so a run is reproducible whether its base
model was built in the same process or read from the cache), the accelerator and this
process's rank, the console, the torch threads, the run directory (claimed, its config
saved), the base model (built on first use), the tokenizer, and the policy (full weights or
LoRA adapters, from the checkpoint when resuming). :class:`TrainingRun` then restores the
optimizer and scheduler, writes checkpoints (rank 0 only; weights and optimizer state are the
same on every rank) and saves the final model as plain HF weights.

Resuming takes the newest checkpoint that matches its checksum manifest (a corrupt one is set
aside with a one-line warning, ``checkpoint.latest_valid``); ``final/`` is written under a
temporary name and renamed when complete, so it is never half there.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from ahamoment import atomic, checkpoint, logprobs, lora
from ahamoment.args import LoraArgs, ModelArgs, TrainArgs
from ahamoment.base_models import ensure_base_model
from ahamoment.distributed import Ranks, make_accelerator, share_threads
from ahamoment.models import load_tokenizer
from ahamoment.runs import RunDir


@dataclass
class TrainingRun:
    """One training run of a stage, set up by :func:`start`."""

    accelerator: Accelerator
    ranks: Ranks
    console: Console
    run: RunDir
    resume_from: Path | None
    """The checkpoint resumed from; None for a fresh run."""
    base_path: Path
    tokenizer: Any
    model: torch.nn.Module
    """The policy: the HF model, or a peft model holding LoRA adapters."""
    keep: int
    """Checkpoints kept on disk."""

    @property
    def checkpoints(self) -> Path:
        return self.run / "checkpoints"

    def restore(self, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """The optimizer, scheduler and RNG state of the checkpoint resumed from, and its saved
        loop state (``{"step": 0}`` for a fresh run)."""
        if self.resume_from is None:
            return {"step": 0}
        state = checkpoint.load_trainer_state(self.resume_from, optimizer, scheduler)
        self.console.print(f"[bold]Resuming[/] {self.run} from step {state['step']}")
        return state

    def save(
        self,
        step: int,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        files: dict[str, Callable[[Path], None]] | None = None,
        **state: Any,
    ) -> Path:
        """Checkpoint ``step`` (rank 0 writes; the returned path is where it went). ``files``:
        more parts of the checkpoint, written by ``fn(path)`` before it is sealed."""
        path = self.checkpoints / f"step-{step}"
        if self.ranks.main:
            path = checkpoint.save(
                self.checkpoints,
                step,
                self.accelerator.unwrap_model(model),
                self.tokenizer,
                optimizer,
                scheduler,
                {"run": str(self.run), **state},
                self.keep,
                files,
            )
        return path

    def save_final(self, model: Any) -> Path:
        """Plain HF weights (LoRA adapters merged in) and the tokenizer in ``final/``. Every
        rank takes part: FSDP and ZeRO-3 gather the full state dict from their shards."""
        policy = self.accelerator.unwrap_model(model)
        full_state = None if lora.is_lora(policy) else self.accelerator.get_state_dict(model)
        out = self.run / "final"
        if self.ranks.main:
            tmp = self.run / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                lora.save_merged(policy, self.tokenizer, tmp, full_state)
                atomic.fault_point("final.written")
                atomic.publish_dir(tmp, out)
            except Exception as e:  # disk full, read-only, ...
                why = atomic.why_not_written(e, self.run.path)
                shutil.rmtree(tmp, ignore_errors=True)
                raise atomic.WriteError(f"cannot write {out}: {why}") from e
        return out


class _Config(ModelArgs, TrainArgs, LoraArgs):
    """What :func:`start` reads (a stage config inherits these groups)."""


def start(cfg: _Config, stage: str, console: Console | None = None) -> TrainingRun:
    """Set up a training run of ``stage`` (see the module docstring)."""
    torch.manual_seed(cfg.seed)
    accelerator = make_accelerator(cfg.device, cfg.bf16)
    ranks = Ranks.current()
    console = (console or Console()) if ranks.main else Console(quiet=True)
    share_threads(cfg.threads)
    run = RunDir.resolve(cfg.out, stage, cfg.resume, ranks)
    resume_from = None
    if cfg.resume and ranks.main:  # rank 0 checks the checksums (and sets corrupt ones aside)
        resume_from = checkpoint.latest_valid(
            run / "checkpoints",
            lambda line: console.print(line, style="yellow", markup=False, soft_wrap=True),
        )
    if ranks.world > 1:
        found = ranks.broadcast(str(resume_from) if resume_from else "")
        resume_from = Path(found) if found else None
    if cfg.resume and resume_from is None:
        console.print(f"[yellow]--resume: no checkpoint in {run / 'checkpoints'}; from step 0.")
    run.claim(cfg.resume, resume_from, ranks)
    if ranks.main:
        run.save_config(cfg)
    with ranks.main_first():  # rank 0 builds the embedded model on first use, the rest reuse it
        base_path = ensure_base_model(
            cfg.model, cfg.task, cfg.pretrain_recipe, cfg.threads, console
        )
    tokenizer = load_tokenizer(base_path)
    model = lora.load_policy(
        base_path, resume_from, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets
    ).to(accelerator.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile_train and cfg.gradient_checkpointing:
        console.print(
            "[yellow]--compile-train: no effect with --gradient-checkpointing, which runs the "
            "model's own forward"
        )
    elif cfg.compile_train and not logprobs.compile_layers(model):
        console.print("[yellow]--compile-train: this model is not run packed; not compiled")
    return TrainingRun(
        accelerator=accelerator,
        ranks=ranks,
        console=console,
        run=run,
        resume_from=resume_from,
        base_path=base_path,
        tokenizer=tokenizer,
        model=model,
        keep=cfg.keep_checkpoints,
    )


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (with LoRA, the adapters only)."""
    return [p for p in model.parameters() if p.requires_grad]


RL_BETAS = (0.9, 0.99)
"""AdamW betas of `aha zero`. β2 0.99 where pretraining and SFT use 0.95 (``LM_BETAS``): each RL
step is one noisy rollout batch, so the second moment averages over ~100 steps, not ~20."""
LM_BETAS = (0.9, 0.95)
"""AdamW betas of `aha pretrain` and `aha sft`: the usual language-model training setting."""


def adamw(
    model: torch.nn.Module, cfg: TrainArgs, betas: tuple[float, float], fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the parameters that train, at the config's learning rate and weight decay;
    ``fused``: one kernel over all parameters."""
    return torch.optim.AdamW(
        trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, fused=fused
    )
