"""LoRA through peft, for `aha zero` (the default recipe trains rank-8 adapters) and `aha sft`.

With ``lora_rank > 0`` the policy is ``peft.get_peft_model(base, LoraConfig(...))``: the base
weights are frozen and only the adapters train (and sit in the optimizer). What leaves the
trainer is always plain HF weights with the adapters merged in:

- ``final/`` is a merged model (``save_merged``), so `aha eval`, `aha serve` and vLLM load it
  like any other;
- the vLLM engine's ``sync_weights`` pushes ``merged_state_dict``: W + B·A·alpha/r per adapted
  layer, computed without touching the trainer's weights (peft's in-place ``merge_adapter`` /
  ``unmerge_adapter`` would add and subtract the delta, and the base weights would drift by
  float rounding at every sync);
- checkpoints hold the adapters only (``adapter_model.safetensors``); resume loads the base and
  then the adapters (``load_policy``).

The torch engine samples from a plain copy with the adapters merged in (``merged_copy``),
refreshed after every optimizer step like vLLM's; ``sampling_model`` is the adapted HF model
inside the peft wrapper, for code that reads its layers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ahamoment.models import load_model

INSTALL_HINT = "pip install 'peft>=0.21.2,<0.22' (a dependency of ahamoment)"


def _peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            f"LoRA (lora_rank > 0) needs peft, which is not installed: {INSTALL_HINT}"
        ) from e
    return peft


def check(rank: int, alpha: float, targets: str) -> None:
    """Reject bad LoRA settings early (config ``__post_init__``)."""
    if rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0: no LoRA), got {rank}")
    if rank and alpha <= 0:
        raise ValueError(f"lora_alpha must be positive, got {alpha}")
    if rank and not [t for t in targets.split(",") if t.strip()]:
        raise ValueError("lora_targets: name at least one module (e.g. q_proj,v_proj)")


def wrap(model: torch.nn.Module, rank: int, alpha: float, targets: str) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters on ``targets`` (B = 0: the output is unchanged)."""
    peft = _peft()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=[t.strip() for t in targets.split(",") if t.strip()],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def load_policy(
    base: str | Path, resume_from: Path | None, rank: int, alpha: float, targets: str
) -> torch.nn.Module:
    """The trainable policy: the checkpoint (or base) model, or the base model with adapters
    (new ones, or the checkpoint's when resuming)."""
    if not rank:
        return load_model(resume_from or base)
    model = load_model(base)
    if resume_from is None:
        return wrap(model, rank, alpha, targets)
    return _peft().PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)


def is_lora(model: torch.nn.Module) -> bool:
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")


def sampling_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM inside a peft wrapper (its layers still apply the adapters), else
    ``model``: our sampler reads ``model.model.layers``, which a ``PeftModel`` hides."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@torch.no_grad()
def merged_copy(model: torch.nn.Module, base: str | Path) -> torch.nn.Module:
    """A plain model of ``base``'s architecture holding ``model``'s weights with the adapters
    merged in, on ``model``'s device: what our sampler decodes from. Each projection is then one
    matmul, not three (W·x + B·(A·x)·alpha/r). ``TorchEngine.sync_weights(policy)`` refreshes it
    after every optimizer step."""
    device = next(model.parameters()).device
    plain = load_model(base).to(device)
    plain.load_state_dict(merged_state_dict(model))
    return plain.eval().requires_grad_(False)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF parameter names -> weights with every active adapter merged in, as a plain model of
    the base architecture has them (``model.layers.0.self_attn.q_proj.weight``). Takes a
    ``PeftModel`` or the adapted base model; a model without LoRA gives its own state dict.
    The trainer's weights are not modified."""
    state = model.state_dict()
    if not is_lora(model):
        return dict(state)
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        out[key.removeprefix(prefix).replace(".base_layer.", ".")] = value.detach()
    for name, module in model.named_modules():
        if not _is_lora_layer(module) or getattr(module, "merged", False):
            continue
        key = f"{name.removeprefix(prefix)}.weight"
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_A", {}):
                out[key] = out[key] + module.get_delta_weight(adapter).to(out[key].dtype)
    return out


def save_merged(
    model: torch.nn.Module,
    tokenizer: Any,
    out: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save plain HF weights (adapters merged, on a copy) and the tokenizer to ``out``;
    ``state_dict``: the full weights when ``model`` holds only a shard (FSDP, ZeRO-3)."""
    if hasattr(model, "merge_and_unload"):  # a PeftModel
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(out), state_dict=state_dict)
    tokenizer.save_pretrained(str(out))
