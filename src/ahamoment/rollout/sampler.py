"""Batched KV-cache sampling over any transformers decoder.

One prefill over the left-padded prompts, then one token per step for every live row.
Rows that finish (stop id or length) are retired from the batch and its cache, so the long
tail of a batch costs only the rows still running. Per-token log-probs are those of the
distribution the token was drawn from after temperature (before top-p/top-k truncation);
they serve as a sampler/trainer mismatch diagnostic, never as old-policy log-probs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop id was emitted, and is kept) or "length"


def _filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    # logits: (B, V), already temperature-scaled
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


class _LlamaLike:
    """A functional forward over a Llama/Qwen2-style HF model with a preallocated KV cache.

    Reuses the model's own modules (norms, projections, rotary embedding, MLP), so weights
    and RoPE variants stay exactly those of transformers; only the cache and the loop are ours.
    """

    SUPPORTED = ("llama", "qwen2", "mistral")

    def __init__(self, model: PreTrainedModel, batch: int, max_len: int) -> None:
        self.model = model
        inner = model.model
        self.layers = inner.layers
        self.cfg = model.config
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = self.cfg.num_attention_heads
        self.n_kv = self.cfg.num_key_value_heads
        dtype = next(model.parameters()).dtype
        shape = (len(self.layers), batch, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)  # (L, B, Hkv, Tmax, D)
        self.v = torch.zeros(shape, dtype=dtype)
        self.valid = torch.zeros((batch, max_len), dtype=torch.bool)  # (B, Tmax) key is real
        self.t = 0  # columns filled

    @classmethod
    def supports(cls, model: PreTrainedModel) -> bool:
        return getattr(model.config, "model_type", "") in cls.SUPPORTED and hasattr(model, "model")

    def select(self, idx: torch.Tensor) -> None:
        self.k, self.v, self.valid = self.k[:, idx], self.v[:, idx], self.valid[idx]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids, pos, valid: (B, S) new tokens; returns last-position logits (B, V)."""
        B, S = ids.shape
        t0, t1 = self.t, self.t + S
        self.valid[:B, t0:t1] = valid
        h = self.model.model.embed_tokens(ids)  # (B, S, C)
        cos, sin = self.model.model.rotary_emb(h, pos)
        keys_ok = self.valid[:B, :t1]  # (B, t1)
        if S == 1:
            mask = keys_ok[:, None, None, :]  # (B, 1, 1, t1)
        else:  # prefill: causal within the new block, plus padding
            causal = torch.ones((S, t1), dtype=torch.bool).tril(diagonal=t0)
            mask = causal[None, None] & keys_ok[:, None, None, :]
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: avoid NaN
        rep = self.n_heads // self.n_kv
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, D)
            k = attn.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
            v = attn.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[li, :B, :, t0:t1] = k
            self.v[li, :B, :, t0:t1] = v
            kk, vv = self.k[li, :B, :, :t1], self.v[li, :B, :, :t1]
            if rep > 1:
                kk, vv = kk.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(B, S, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.t = t1
        h = self.model.model.norm(h[:, -1])
        return self.model.lm_head(h)  # (B, V)


class _HFCache:
    """Fallback for other architectures: transformers' own DynamicCache."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache()
        self.attn: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> None:
        self.cache.batch_select_indices(idx)
        assert self.attn is not None
        self.attn = self.attn[idx]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        v = valid.long()
        self.attn = v if self.attn is None else torch.cat([self.attn, v], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self.attn,
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1, :]


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[Completion]:
    """Sample one completion per prompt (repeat a prompt in ``prompts`` for a group)."""
    was_training = model.training
    model.eval()
    B = len(prompts)
    # Identical prompts (a GRPO group) are prefilled once; their cache rows are then copied.
    uniq: dict[tuple[int, ...], int] = {}
    row_prompt = torch.tensor([uniq.setdefault(tuple(p), len(uniq)) for p in prompts])
    U = len(uniq)
    max_prompt = max(len(p) for p in uniq)
    input_ids = torch.full((U, max_prompt), pad_id, dtype=torch.long)
    valid = torch.zeros((U, max_prompt), dtype=torch.bool)
    for i, p in enumerate(uniq):  # left padding: every prompt ends at the same column
        input_ids[i, max_prompt - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, max_prompt - len(p) :] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    if _LlamaLike.supports(model):
        runner: _LlamaLike | _HFCache = _LlamaLike(model, U, max_prompt + params.max_new_tokens)
    else:
        runner = _HFCache(model)
    logits = runner.forward(input_ids, positions, valid)[row_prompt]  # (B, V)
    if U < B or isinstance(runner, _HFCache):
        runner.select(row_prompt)
    next_pos = positions[row_prompt, -1] + 1  # (B,)

    stop = torch.tensor(sorted(set(params.stop_ids)), dtype=torch.long)
    live = torch.arange(B)  # original prompt index of each live row
    slot = torch.arange(B)  # cache row of each live row
    n_cache = B
    result_ids: list[list[int]] = [[] for _ in range(B)]
    result_lp: list[list[float]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    greedy = params.temperature <= 0.0
    for step in range(params.max_new_tokens):
        if greedy:
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok = logp.argmax(-1)
        else:
            scaled = logits.float() / params.temperature
            logp = torch.log_softmax(scaled, dim=-1)
            probs = torch.softmax(_filter_logits(scaled, params.top_p, params.top_k), dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        for t, lp, r in zip(tok.tolist(), tok_lp.tolist(), live.tolist()):
            result_ids[r].append(t)
            result_lp[r].append(lp)
        done = torch.isin(tok, stop) if len(stop) else torch.zeros_like(tok, dtype=torch.bool)
        for r in live[done].tolist():
            reasons[r] = "stop"
        keep = ~done
        if step == params.max_new_tokens - 1 or not bool(keep.any()):
            break
        live, tok, next_pos, slot = live[keep], tok[keep], next_pos[keep], slot[keep]
        # Compact the cache once a quarter of its rows are finished, so copies stay O(cache);
        # until then finished rows ride along as padding and their outputs are dropped.
        if len(live) <= 0.75 * n_cache or (isinstance(runner, _HFCache) and len(live) < n_cache):
            runner.select(slot)
            slot, n_cache = torch.arange(len(live)), len(live)
        ids = torch.full((n_cache, 1), pad_id, dtype=torch.long)
        pos = torch.zeros((n_cache, 1), dtype=torch.long)
        new_valid = torch.zeros((n_cache, 1), dtype=torch.bool)
        ids[slot, 0], pos[slot, 0], new_valid[slot, 0] = tok, next_pos, True
        logits = runner.forward(ids, pos, new_valid)[slot]
        next_pos = next_pos + 1
    model.train(was_training)
    return [Completion(result_ids[i], result_lp[i], reasons[i]) for i in range(B)]
