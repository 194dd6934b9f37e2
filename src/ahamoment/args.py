"""Argument groups shared by the training stages: dataclass mixins of config fields.

`aha zero` and `aha sft` inherit these groups, so a shared flag is declared and documented
once. A stage may give a field of a group another default by declaring it again without a
docstring. ``aha STAGE --help`` shows each group as a section (``config.add_arguments``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ahamoment import lora
from ahamoment.evaluation import HeldoutSet
from ahamoment.splits import heldout
from ahamoment.tasks import TASKS

DEVICES = ("cpu", "auto")


@dataclass
class ModelArgs:
    """Base model and task"""

    model: str = ""
    """Local Hugging Face causal-LM directory. Empty: the embedded default for --task, built by `aha pretrain` on first use and cached."""
    pretrain_recipe: str = ""
    """With no --model: the `aha pretrain` YAML recipe of the base model to build or reuse; in a recipe, relative to that recipe (empty: `aha pretrain`'s defaults)."""
    task: str = "countdown"
    """Task trained and evaluated on: countdown, countdown_tinyzero, countdown_tinyzero_100, arithmetic, math, or an import path pkg.mod:obj."""

    def check(self) -> None:
        TASKS.get(self.task)


@dataclass
class TrainArgs:
    """Optimisation, hardware and the run directory"""

    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 5
    """Linear learning-rate warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    save_every: int = 50
    """Checkpoint every N steps (and on Ctrl-C or kill); 0: only then."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk, the newest; 0 keeps every one."""
    out: str = ""
    """Run directory; empty: runs/<stage>-<timestamp>."""
    resume: bool = False
    """Continue the run in --out (or the newest runs/<stage>-*) from its last checkpoint."""
    seed: int = 0
    """Seed of every random draw: prompts or data order, sampling, evaluation."""
    threads: int = 0
    """torch CPU threads; 0 shares the cores this process may run on among the processes of this machine."""
    device: str = "cpu"
    """Where to train: cpu, or auto (what accelerate picks: the process's GPU when there is one)."""
    bf16: bool = False
    """bf16 mixed precision through accelerate (autocast; weights and optimizer state stay fp32); for GPUs, slower than fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more compute."""
    compile_train: bool = False
    """torch.compile each layer's norms, projections and MLP in the trainer's packed forward and backward (inductor; one graph for every sequence length). For GPUs: on fp32 CPU our C kernels run those parts as fast without a compile (faster with LoRA), so there it only adds the compile (tens of seconds)."""

    def check(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.lr <= 0 or self.warmup < 0 or self.max_grad_norm <= 0:
            raise ValueError("lr and max_grad_norm must be positive, warmup >= 0")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("save_every and keep_checkpoints must be >= 0")


@dataclass
class LoraArgs:
    """LoRA adapters (peft)"""

    lora_rank: int = 0
    """LoRA rank r; 0: full fine-tuning of every weight."""
    lora_alpha: float = 32.0
    """LoRA scaling alpha (the update is B·A·alpha/r)."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated module names that get LoRA adapters."""

    def check(self) -> None:
        lora.check(self.lora_rank, self.lora_alpha, self.lora_targets)


@dataclass
class HeldoutArgs:
    """Held-out evaluation"""

    heldout_n: int = 500
    """Held-out problems (never trained on: disjoint by canonical form) evaluated before and after training."""
    eval_k: int = 4
    """Samples per held-out problem: pass@1 is their mean correctness; pass@k and cons@k use all k."""
    eval_temperature: float = 1.0
    """Held-out sampling temperature."""
    max_new_tokens: int = 128
    """Longest completion in tokens, in rollouts and evaluations; longer ones are cut (finish reason 'length')."""
    real_eval: bool = True
    """Also evaluate on the packaged real Countdown sample (1,024 TinyZero problems; Countdown tasks only)."""

    def heldout_set(
        self,
        model: Any,
        tokenizer: Any,
        task: str,
        *,
        top_p: float = 1.0,
        engine: Any = None,
        reversed_digits: bool = False,
    ) -> HeldoutSet:
        """The run's held-out evaluations: the first ``heldout_n`` held-out problems of
        ``task``, at these settings, seeded from ``seed``."""
        return HeldoutSet(
            model=model,
            tokenizer=tokenizer,
            problems=heldout(task, self.heldout_n),
            k=self.eval_k,
            temperature=self.eval_temperature,
            top_p=top_p,
            max_new_tokens=self.max_new_tokens,
            seed=getattr(self, "seed", 0),
            engine=engine,
            reversed_digits=reversed_digits,
        )

    def check(self) -> None:
        if self.heldout_n < 0 or self.eval_k < 1 or self.max_new_tokens < 1:
            raise ValueError("heldout_n must be >= 0; eval_k and max_new_tokens >= 1")
        if self.eval_temperature < 0:
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}")


def check_groups(cfg: object) -> None:
    """Run the checks of every argument group ``cfg`` inherits (from ``__post_init__``)."""
    for group in (ModelArgs, TrainArgs, LoraArgs, HeldoutArgs):
        if isinstance(cfg, group):
            group.check(cfg)  # type: ignore[arg-type]
