"""Functional pieces over a Llama/Qwen2/Mistral-style transformers decoder.

The sampler (``rollout/sampler.py``) and the trainer's packed log-probs (``logprobs.py``) run
the model's own modules (norms, projections, rotary embedding, MLP) in loops of their own: the
weights, RoPE variants and adapters (peft) stay exactly those of the HF model, only the batch
layout is ours. Both share the attention projections and the prompt forward defined here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ahamoment import fused_ops
from ahamoment.lora_linear import linear, mlp

SUPPORTED = ("llama", "qwen2", "mistral")

KV_CACHE = ("model", "float16")
"""What the sampler's key/value cache holds. model (the default): the model's dtype. float16:
half floats, half the bytes a decoding step's attention reads from an fp32 model's cache; keys
and values are rounded to it once, when cached (every attention then reads the rounded values,
the prompt's own included), and the arithmetic stays in the model's dtype."""


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a ``KV_CACHE`` choice for a model of ``model_dtype``; ValueError naming the
    choices for another name."""
    if name not in KV_CACHE:
        raise ValueError(f"kv_cache: {name!r} is not one of {', '.join(KV_CACHE)}")
    return torch.float16 if name == "float16" else model_dtype


def supports(model: torch.nn.Module) -> bool:
    """A causal LM whose layers these functions can run (``model.model.layers``)."""
    return getattr(getattr(model, "config", None), "model_type", "") in SUPPORTED and hasattr(
        model, "model"
    )


def fits_window(model: PreTrainedModel, max_len: int) -> bool:
    """True unless some layer uses sliding-window attention shorter than ``max_len``."""
    for layer in model.model.layers:
        window = getattr(layer.self_attn, "sliding_window", None)
        if window and max_len > window:
            return False
    return True


def qkv(
    attn: torch.nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotate: bool = True,
    project=linear,
):
    """Rotated queries (..., S, H, D) and keys, and values (..., S, Hkv, D), from the normed
    hidden states ``x`` (..., S, C); ``cos``/``sin`` (..., S, D) from the model's rotary_emb.
    ``rotate=False``: queries and keys before RoPE (for a kernel that applies it).
    ``project(module, x)`` runs a projection (default: ``lora_linear.linear``)."""
    D = attn.head_dim
    q = project(attn.q_proj, x).unflatten(-1, (-1, D))
    k = project(attn.k_proj, x).unflatten(-1, (-1, D))
    v = project(attn.v_proj, x).unflatten(-1, (-1, D))
    if rotate:
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=-2)
    return q, k, v


def prefill(
    model: PreTrainedModel,
    ids: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    kv_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Forward of left-padded prompts ids, pos, valid (U, S): the last layer's hidden states
    (U, S, C), before the final norm, and each layer's keys and values (U, Hkv, S, D).
    ``kv_dtype`` (a narrower cache's type): keys and values are rounded to it, then attended
    to. Differentiable (the trainer backpropagates through it); the sampler calls it under
    no_grad."""
    U, S = ids.shape
    h = model.model.embed_tokens(ids)  # (U, S, C)
    cos, sin = model.model.rotary_emb(h, pos)
    causal = torch.ones((S, S), dtype=torch.bool, device=ids.device).tril()
    mask = causal[None, None] & valid[:, None, None, :]
    mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: avoid NaN
    keys, values = [], []
    for layer in model.model.layers:
        attn = layer.self_attn
        q, k, v = qkv(attn, fused_ops.rms_norm(layer.input_layernorm, h), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (U, H|Hkv, S, D)
        if kv_dtype is not None and kv_dtype != k.dtype:  # as the cache will hold them
            k, v = k.to(kv_dtype).to(q.dtype), v.to(kv_dtype).to(q.dtype)
        keys.append(k)
        values.append(v)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=k.shape[1] != q.shape[1]
        )
        h = h + linear(attn.o_proj, o.transpose(1, 2).reshape(U, S, -1))
        h = h + mlp(layer.mlp, fused_ops.rms_norm(layer.post_attention_layernorm, h))
    return h, keys, values
