"""Batched KV-cache sampling over any transformers decoder (the "torch" engine).

One prefill over the left-padded distinct prompts, then one token per step for every live row.
Rows that finish (stop id, stop string or length) are retired from the batch and its cache, so
the long tail of a batch costs only the rows still running. Llama/Qwen2/Mistral-style models
run on a preallocated cache (``_LlamaLike``); other decoders use transformers' DynamicCache.

Every row carries its own sampling settings (temperature, top-p, top-k, max new tokens, stop
ids and strings) as per-row tensors, so greedy and sampled requests share one batch.
A row with a thinking budget (``SamplingParams.budget``, ``budget.py``) carries a small state
machine that may replace the drawn token by a forced one (``</think>`` at the maximum, "Wait"
before the minimum); the forced token's log-prob is the model's, like any other.
``sample_stream`` yields each step's tokens as they are drawn; ``sample`` collects them.
``compile=True`` (opt-in, on ``sample``, ``sample_stream`` and ``TorchEngine``) runs each step
through the fused C kernels of ``compiled.py`` instead: the same tokens from the same uniforms,
log-probs equal to float rounding; eager after one warning line where they cannot run. On CUDA
it replays the step from CUDA graphs instead (``graphs.py``: fixed shapes, slots in buckets).

Per-token log-probs are those of ``log_softmax(logits / temperature)`` (before top-p/top-k
truncation; raw logits for greedy rows). They serve as a sampler/trainer mismatch
diagnostic, never as old-policy log-probs.

Randomness: one uniform per live row per step, turned into a token by inverse CDF
(``_draw``), so a sampled row's draws depend on which other rows share its batch. Each row
is still an exact draw from its own distribution; a fixed seed reproduces a fixed batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache, PreTrainedModel

from ahamoment import decoder, lora
from ahamoment.lora_linear import linear, mlp
from ahamoment.rollout import compiled, graphs
from ahamoment.rollout.base import (
    ENGINES,
    Completion,
    Request,
    SamplingParams,
    StopStrings,
    TokenEvent,
    per_request,
    resolve_pad_id,
)
from ahamoment.rollout.budget import BudgetState

__all__ = ["Completion", "SamplingParams", "StepToken", "TorchEngine", "sample", "sample_stream"]


def _filter_logits(
    logits: torch.Tensor, top_p: float | torch.Tensor, top_k: int | torch.Tensor
) -> torch.Tensor:
    """Mask tokens outside top-k, then outside the top-p nucleus; per row when given (B,) tensors.

    logits: (B, V), already temperature-scaled. ``top_k <= 0`` and ``top_p >= 1`` disable a filter.
    """
    B, V = logits.shape
    k = torch.as_tensor(top_k, dtype=torch.long).expand(B)
    p = torch.as_tensor(top_p, dtype=logits.dtype).expand(B)
    use_k = (k > 0) & (k < V)
    if bool(use_k.any()):
        k_eff = torch.where(use_k, k, 1)
        vals = torch.topk(logits, int(k_eff.max()), dim=-1).values  # (B, kmax), descending
        kth = vals.gather(-1, (k_eff - 1)[:, None])
        kth = kth.masked_fill(~use_k[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    use_p = p < 1.0
    if bool(use_p.any()):
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = ((probs.cumsum(-1) - probs) >= p[:, None]) & use_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) by inverse CDF: one uniform per row, located
    in the row's cumulative probabilities (cheaper than ``torch.multinomial``).

    Masked tokens (-inf) have probability exactly 0, so their cumulative value equals the
    previous one and ``searchsorted(..., right=True)`` (first bin whose cumulative value
    exceeds u) never lands on them. The uniform is scaled by the row's total (round-off
    leaves it a little off 1) and kept strictly below it, so the last bin is always found.
    """
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(-1)  # (B, V)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype)
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class _LlamaLike:
    """A functional forward over a Llama/Qwen2-style HF model with its own KV cache.

    Reuses the model's own modules (norms, projections, rotary embedding, MLP), so weights
    and RoPE variants stay exactly those of transformers; only the cache and the loop are ours.
    Sliding-window attention is not implemented: such models run on ``_HFCache`` once a
    sequence could exceed the window (see ``decoder.fits_window``).

    The cache has two parts. The prompt part (L, U, Hkv, Lp, D) is kept once per distinct
    prompt (a GRPO group of G rows shares one), filled by the prefill. The completion part
    (L, NB, U, Hkv, G, BLOCK, D), in blocks of time, is a grid of slots, G per prompt
    (``start``); a slot without a row (ragged groups) or whose row finished decodes padding
    until the next compaction (``retire``). A decoding step scores the group's queries against its prompt's keys as one
    matmul, (U, Hkv, G*rep, D) x (U, Hkv, D, Lp), concatenates each row's own completion
    scores and takes one softmax, so the prompt cache is never copied G times and its keys
    are read once per group. When groups get too ragged for a grid (more than a quarter
    gaps), each row gets its own copy of its prompt's cache (G = 1).
    """

    BLOCK = 32
    """Completion-cache columns per block. Each block (U, Hkv, G, BLOCK, D) is contiguous, so a
    decoding step streams through the cache block by block. Slicing the first t columns of one
    (.., T, D) cache per row instead leaves a gap after every row, which is slower once the
    cache outgrows the CPU caches (docs/results/performance.md)."""

    def __init__(self, model: PreTrainedModel, kv_cache: str = "model") -> None:
        """The prompt cache comes from ``prefill``, the completion cache from ``start``;
        ``kv_cache``: their dtype (``decoder.KV_CACHE``; the arithmetic stays the model's)."""
        self.model = model
        inner = model.model
        self.layers = inner.layers
        self.cfg = model.config
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = self.cfg.num_attention_heads
        self.n_kv = self.cfg.num_key_value_heads
        self.rep = self.n_heads // self.n_kv
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.kv_dtype = decoder.kv_cache_dtype(kv_cache, self.dtype)
        # set by prefill: kp, vp (L, U, Hkv, Lp, D), pvalid (U, Lp); by start: k, v, T, pbias
        self.t = 0  # completion columns filled
        self.U = self.G = 0

    @classmethod
    def supports(cls, model: PreTrainedModel) -> bool:
        return decoder.supports(model)

    def prefill(
        self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, last_only: bool = True
    ) -> torch.Tensor:
        """ids, pos, valid: (U, S) left-padded prompts; returns last-position logits (U, V),
        or (U, S, V). Fills the prompt cache."""
        h, keys, values = decoder.prefill(self.model, ids, pos, valid, self.kv_dtype)
        kv = self.kv_dtype
        self.kp, self.vp = torch.stack(keys).to(kv), torch.stack(values).to(kv)  # (L,U,Hkv,S,D)
        self.pvalid = valid.clone()
        if last_only:
            h = h[:, -1]
        return linear(self.model.lm_head, self.model.model.norm(h))

    forward = prefill  # the prefill is the only multi-token forward

    @property
    def size(self) -> int:
        """Completion-cache slots, U x G (gaps included)."""
        return self.U * self.G

    def start(self, row_prompt: torch.Tensor, max_new: int) -> torch.Tensor:
        """Allocate the completion cache for rows of prompts ``row_prompt`` (B,) (indices into
        the prefill); returns each row's slot."""
        self.T = max(1, max_new)
        self.t = 0
        slot, _ = self._layout(row_prompt, force=True)
        assert slot is not None
        return slot

    def retire(self, slot: torch.Tensor) -> torch.Tensor | None:
        """Only the rows at ``slot`` (n,) go on. Compacts the cache when that shrinks it to at
        most 3/4 of its slots and returns the new slots; otherwise None (finished rows and
        gaps ride along, their outputs dropped)."""
        new, _ = self._layout(slot, force=False)
        return new

    def _layout(self, src: torch.Tensor, force: bool) -> tuple[torch.Tensor | None, int]:
        """Lay rows out as a (U, G) grid: prompt u's rows in slots u*G .. u*G+G-1. ``src`` is
        each row's prompt (``force``: the first layout) or its current slot. A grid with many
        gaps (ragged groups) becomes one prompt copy per row (G = 1) instead."""
        if force:
            u = src
        else:
            u = torch.div(src, self.G, rounding_mode="floor")
        n = len(src)
        used, inv = torch.unique(u, return_inverse=True)
        counts = torch.bincount(inv, minlength=len(used))
        G = int(counts.max())
        per_row = len(used) * G > 1.25 * n
        size = n if per_row else len(used) * G
        if not force and size > 0.75 * self.size:
            return None, size
        if per_row:
            new_u, new_g, pick = torch.arange(n, device=src.device), torch.zeros_like(u), u
            U, G = n, 1
        else:
            order = torch.argsort(inv, stable=True)
            start = torch.cumsum(counts, 0) - counts
            new_g = torch.empty_like(inv)
            new_g[order] = torch.arange(n, device=src.device) - start[inv[order]]
            new_u, pick, U = inv, used, len(used)
        L, _, Hkv, _, D = self.kp.shape
        shape = (L, -(-self.T // self.BLOCK), U, Hkv, G, self.BLOCK, D)
        # Gaps are read (their outputs dropped): zeros, never NaN. Otherwise a block is zeroed
        # when decoding enters it (``step``), so memory is touched only as rows decode: an
        # evaluation batch whose rows mostly stop early never makes the whole cache resident.
        make = torch.zeros if U * G > n else torch.empty
        k = make(shape, dtype=self.kv_dtype, device=self.device)
        v = make(shape, dtype=self.kv_dtype, device=self.device)
        if not force and self.t:
            old_g, nb = src - u * self.G, -(-self.t // self.BLOCK)  # blocks written so far
            k[:, :nb, new_u, :, new_g] = self.k[:, :nb, u, :, old_g]
            v[:, :nb, new_u, :, new_g] = self.v[:, :nb, u, :, old_g]
        self.k, self.v = k, v  # (L, NB, U, Hkv, G, BLOCK, D)
        self.kp, self.vp, self.pvalid = self.kp[:, pick], self.vp[:, pick], self.pvalid[pick]
        bias = torch.zeros(self.pvalid.shape, dtype=self.dtype, device=self.device)
        self.pbias = bias.masked_fill(~self.pvalid, float("-inf"))[:, None, None, :]  # (U,1,1,Lp)
        self.U, self.G = U, G
        return new_u * G + new_g, size

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos: (U*G,) one new token per slot; returns logits (U*G, V)."""
        U, G, t = self.U, self.G, self.t
        S = U * G
        Hkv, rep, D = self.n_kv, self.rep, self.head_dim
        blk, col = divmod(t, self.BLOCK)
        nb = blk + 1  # blocks holding columns 0..t
        if col == 0:  # a new block: its unwritten columns are read with probability 0
            self.k[:, blk].zero_()
            self.v[:, blk].zero_()
        tail = torch.zeros(nb * self.BLOCK, dtype=self.dtype, device=self.device)
        tail[t + 1 :] = float("-inf")  # the last block's columns not yet written
        h = self.model.model.embed_tokens(ids[:, None])  # (S, 1, C)
        cos, sin = self.model.model.rotary_emb(h, pos[:, None])
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = decoder.qkv(attn, layer.input_layernorm(h), cos, sin)  # (S, 1, H|Hkv, D)
            self.k[li, blk, :, :, :, col] = k.view(U, G, Hkv, D).transpose(1, 2)
            self.v[li, blk, :, :, :, col] = v.view(U, G, Hkv, D).transpose(1, 2)
            # (U, Hkv, G, rep, D): head h of a row uses kv head h // rep
            qg = (q.reshape(U, G, Hkv, rep, D).transpose(1, 2) * attn.scaling).contiguous()
            # each row's own tokens, block by block: (U, Hkv, G, rep, nb*BLOCK)
            # (nb, U, Hkv, G, BLOCK, D) blocks written so far and the prompt's (U, Hkv, Lp, D),
            # in the arithmetic's dtype (a narrower cache is widened once a layer; else no-ops)
            dt = qg.dtype
            kb, vb = self.k[li, :nb].to(dt), self.v[li, :nb].to(dt)
            kp, vp = self.kp[li].to(dt), self.vp[li].to(dt)
            s_c = torch.cat([qg @ kb[j].transpose(-1, -2) for j in range(nb)], dim=-1)
            # the prompt's keys, once per group: (U, Hkv, G*rep, D) x (U, Hkv, D, Lp)
            s_p = qg.view(U, Hkv, G * rep, D) @ kp.transpose(-1, -2) + self.pbias
            Lp = s_p.shape[-1]
            s = torch.cat([s_p.view(U, Hkv, G, rep, Lp), s_c + tail], dim=-1)
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(qg.dtype)
            o = (p[..., :Lp].reshape(U, Hkv, G * rep, Lp) @ vp).view(qg.shape)
            for j in range(nb):  # (U, Hkv, G, rep, D)
                o = o + p[..., Lp + j * self.BLOCK : Lp + (j + 1) * self.BLOCK] @ vb[j]
            o = o.transpose(1, 2).reshape(S, 1, -1)  # (S, 1, H*D), heads in model order
            h = h + linear(attn.o_proj, o)
            h = h + mlp(layer.mlp, layer.post_attention_layernorm(h))
        self.t = t + 1
        return linear(self.model.lm_head, self.model.model.norm(h[:, 0]))


class _HFCache:
    """Fallback for other architectures: transformers' own DynamicCache."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache()
        self.attn: torch.Tensor | None = None
        # transformers >= 5.2x calls the KV-cache argument ``cache``, earlier 5.x
        # ``past_key_values`` (an unknown keyword is silently ignored: no cache at all)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

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
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        return out.logits[:, -1, :]


class StepToken(NamedTuple):
    """One row's token at one decoding step; ``finish_reason`` is set when the row ends."""

    row: int
    token_id: int
    logprob: float
    finish_reason: str | None


def _per_row(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params


def sample_stream(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    tokenizer: Any = None,
    compile: bool = False,
    kv_cache: str = "model",
) -> Iterator[list[StepToken]]:
    """Decode all prompts together, yielding each step's tokens (one list per step).

    ``params`` is one ``SamplingParams`` for every row or one per prompt. Rows are prompt
    indices; a row with ``max_new_tokens == 0`` yields nothing. ``tokenizer`` is needed only
    for stop strings. ``compile``: decode with the fused step (``compiled.py``; on CUDA from
    CUDA graphs, ``graphs.py``; eager after one warning where it cannot run); the same tokens
    up to float rounding. ``kv_cache``: what the key/value cache holds (``decoder.KV_CACHE``:
    model, the model's dtype; float16).
    """
    for rows, toks, lps, ends in _steps(
        model, prompts, params, generator, pad_id, tokenizer, compile, kv_cache
    ):
        yield [StepToken(*t) for t in zip(rows, toks, lps, ends or [None] * len(rows))]


_Step = tuple[list[int], list[int], list[float], list[str | None] | None]
"""One decoding step, row-aligned lists: rows, token ids, log-probs, and finish reasons (None
where no row finished at this step)."""


@torch.no_grad()
def _steps(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | None,
    pad_id: int,
    tokenizer: Any,
    compile: bool,
    kv_cache: str = "model",
) -> Iterator[_Step]:
    """``sample_stream``'s steps as lists, without a ``StepToken`` per token."""
    row_params = _per_row(params, len(prompts))
    stops = [StopStrings(tokenizer, p.stop) for p in row_params]
    rows = [i for i, p in enumerate(row_params) if p.max_new_tokens > 0]
    if not rows:
        return
    was_training = model.training
    model.eval()
    try:
        yield from _decode(
            model, prompts, row_params, stops, rows, generator, pad_id, compile, kv_cache
        )
    finally:
        model.train(was_training)


def _decode(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    row_params: list[SamplingParams],
    stops: list[StopStrings],
    rows: list[int],
    generator: torch.Generator | None,
    pad_id: int,
    compile: bool = False,
    kv_cache: str = "model",
) -> Iterator[_Step]:
    device = next(model.parameters()).device
    B = len(rows)
    ps = [row_params[r] for r in rows]
    # per-row settings, (B,) each; greedy rows divide by 1 and take the argmax
    greedy = torch.tensor([p.greedy for p in ps], device=device)
    scale = torch.tensor([1.0 if p.greedy else p.temperature for p in ps], device=device)
    top_p = torch.tensor([p.top_p for p in ps], device=device)
    top_k = torch.tensor([p.top_k for p in ps], dtype=torch.long, device=device)
    max_new = torch.tensor([p.max_new_tokens for p in ps], dtype=torch.long, device=device)
    n_stop = max(1, max(len(p.stop_ids) for p in ps))
    stop_mat = torch.full((B, n_stop), -1, dtype=torch.long, device=device)  # (B, S), -1 = none
    for i, p in enumerate(ps):
        stop_mat[i, : len(p.stop_ids)] = torch.tensor(p.stop_ids, dtype=torch.long)
    row_stops = [stops[r] for r in rows]
    any_stop_str = any(row_stops)
    budgets = [BudgetState(p.budget, p.stop_ids) if p.budget is not None else None for p in ps]
    any_budget = any(b is not None for b in budgets)

    # Identical prompts (a GRPO group) are prefilled once; their cache rows are then copied.
    uniq: dict[tuple[int, ...], int] = {}
    row_prompt = torch.tensor(
        [uniq.setdefault(tuple(prompts[r]), len(uniq)) for r in rows], device=device
    )
    U = len(uniq)
    max_prompt = max(len(p) for p in uniq)
    input_ids = torch.full((U, max_prompt), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((U, max_prompt), dtype=torch.bool, device=device)
    for i, p in enumerate(uniq):  # left padding: every prompt ends at the same column
        input_ids[i, max_prompt - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, max_prompt - len(p) :] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    max_len = max_prompt + int(max_new.max())
    fast = _compiled_runner(model, max_len, kv_cache) if compile else None
    fused = fast if isinstance(fast, compiled.FusedLlama) else None
    if fast is not None:
        runner: _LlamaLike | _HFCache | compiled.FusedLlama | graphs.StaticLlama = fast
    elif _LlamaLike.supports(model) and decoder.fits_window(model, max_len):
        runner = _LlamaLike(model, kv_cache)
    else:
        runner = _HFCache(model)
    # The fused step also chooses the tokens, from uniforms drawn here exactly as ``_draw``
    # draws them, unless a row needs top-p/top-k or budget forcing (then: eager, on its logits).
    V = model.config.vocab_size
    fused_pick = fused is not None and not any_budget
    fused_pick = fused_pick and all(p.top_p >= 1.0 and not 0 < p.top_k < V for p in ps)
    logits = runner.forward(input_ids, positions, valid)[row_prompt]  # (B, V)
    live = torch.arange(B, device=device)  # batch index of each live row
    if isinstance(runner, (_LlamaLike, compiled.FusedLlama, graphs.StaticLlama)):  # slots
        slot = runner.start(row_prompt, int(max_new.max()))  # cache slot of each live row
        n_cache = runner.size
    else:
        runner.select(row_prompt)
        slot, n_cache = torch.arange(B, device=device), B
    next_pos = positions[row_prompt, -1] + 1  # (B,)
    # Each live row's state, aligned with ``live`` and filtered with it when rows finish (so
    # a step with no finished row indexes nothing): tokens emitted, then its settings.
    count = torch.zeros(B, dtype=torch.long, device=device)
    on = _LiveRows(stop_mat, max_new, greedy, scale, top_p, top_k)
    emitted: list[list[int]] = [[] for _ in range(B)]  # kept only for stop strings
    picked: tuple[torch.Tensor, torch.Tensor] | None = None  # (tok, tok_lp) of a fused step
    while True:
        if picked is not None:
            tok, tok_lp = picked
        else:
            scaled = logits.float() / on.scale[:, None]
            logp = torch.log_softmax(scaled, dim=-1)
            if on.all_greedy:
                tok = logp.argmax(-1)
            else:
                tok = _draw(_filter_logits(scaled, on.top_p, on.top_k), generator)
                if on.any_greedy:
                    tok = torch.where(on.greedy, logp.argmax(-1), tok)
            if any_budget:  # budget forcing may replace the drawn token
                tok = torch.tensor(
                    [
                        t if budgets[b] is None else budgets[b].next(t)
                        for b, t in zip(live.tolist(), tok.tolist())
                    ],
                    dtype=tok.dtype,
                    device=tok.device,
                )
            tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        count += 1
        hit_stop = (tok[:, None] == on.stop).any(-1)
        if any_stop_str:
            for j, (b, t) in enumerate(zip(live.tolist(), tok.tolist())):
                if row_stops[b]:
                    emitted[b].append(t)
                    if row_stops[b].hit(emitted[b]):
                        hit_stop[j] = True
        at_len = count >= on.max_new
        done = hit_stop | at_len
        ends = None
        finished = bool(done.any())
        if finished:
            ends = [
                ("stop" if s else "length") if d else None
                for s, d in zip(hit_stop.tolist(), done.tolist())
            ]
        yield [rows[b] for b in live.tolist()], tok.tolist(), tok_lp.tolist(), ends
        if finished:
            keep = (~done).nonzero()[:, 0]  # (n_live,) positions of the rows that go on
            if len(keep) == 0:
                break
            live, tok, next_pos, slot, count = (
                t.index_select(0, keep) for t in (live, tok, next_pos, slot, count)
            )
            on = on.select(keep)
        # Compact the cache once a quarter of its rows are finished, so copies stay O(cache);
        # until then finished rows ride along as padding and their outputs are dropped.
        if isinstance(runner, (_LlamaLike, compiled.FusedLlama, graphs.StaticLlama)):
            if len(live) <= 0.75 * n_cache:
                new_slot = runner.retire(slot)
                if new_slot is not None:
                    slot, n_cache = new_slot, runner.size
            # finished rows and gaps in the cache decode a pad token; their outputs are dropped.
            # With no gap, slot is 0 .. n_cache-1 (slots only ever keep their order).
            gaps = len(live) < n_cache
            ids, pos = tok, next_pos
            if gaps:
                ids = torch.full((n_cache,), pad_id, dtype=torch.long, device=device)
                pos = torch.zeros((n_cache,), dtype=torch.long, device=device)
                ids[slot], pos[slot] = tok, next_pos
            if isinstance(runner, (_LlamaLike, graphs.StaticLlama)):
                logits = runner.step(ids, pos)
                logits = logits[slot] if gaps else logits
            else:
                picked, logits = _fused_step(
                    runner, ids, pos, slot, on, gaps, fused_pick, generator
                )
        else:
            if len(live) < n_cache:
                runner.select(slot)
                slot, n_cache = torch.arange(len(live), device=device), len(live)
            ids = torch.full((n_cache, 1), pad_id, dtype=torch.long, device=device)
            pos = torch.zeros((n_cache, 1), dtype=torch.long, device=device)
            new_valid = torch.zeros((n_cache, 1), dtype=torch.bool, device=device)
            ids[slot, 0], pos[slot, 0], new_valid[slot, 0] = tok, next_pos, True
            logits = runner.forward(ids, pos, new_valid)[slot]
        next_pos = next_pos + 1


def _compiled_runner(
    model: PreTrainedModel, max_len: int, kv_cache: str
) -> compiled.FusedLlama | graphs.StaticLlama | None:
    """``compile=True``'s step: replayed from CUDA graphs on CUDA (``graphs.py``), the fused C
    kernels elsewhere (``compiled.py``); None (eager) after one warning line where it cannot
    run."""
    if next(model.parameters()).device.type == "cuda":
        return graphs.graphed_runner(model, max_len, kv_cache)
    return compiled.fused_runner(model, max_len, kv_cache)


class _LiveRows:
    """The live rows' settings, each (n_live, ...) in the order of ``_decode``'s ``live``:
    stop ids (n_live, S), token budgets, greedy flags, temperatures (1 where greedy), top-p and
    top-k; ``select`` keeps the rows at some positions."""

    def __init__(self, stop, max_new, greedy, scale, top_p, top_k) -> None:
        self.stop, self.max_new, self.greedy = stop, max_new, greedy
        self.scale, self.top_p, self.top_k = scale, top_p, top_k
        self.all_greedy, self.any_greedy = bool(greedy.all()), bool(greedy.any())
        # as the fused step's kernel takes them (whatever torch's default dtype)
        self.greedy_u8, self.scale_f32 = greedy.to(torch.uint8), scale.float()

    def select(self, keep: torch.Tensor) -> _LiveRows:
        s = (self.stop, self.max_new, self.greedy, self.scale, self.top_p, self.top_k)
        return _LiveRows(*(t.index_select(0, keep) for t in s))


def _fused_step(
    runner: compiled.FusedLlama,
    ids: torch.Tensor,
    pos: torch.Tensor,
    slot: torch.Tensor,
    on: _LiveRows,
    gaps: bool,
    pick: bool,
    generator: torch.Generator | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """One fused step over the cache slots; the live rows are at ``slot`` (every slot when
    not ``gaps``). With ``pick``, it also chooses the live rows' tokens from the uniforms
    ``_draw`` would draw, one per live row in order: returns ((tok, tok_lp), None) for the
    live rows; otherwise (None, logits)."""
    S, n, device, f32 = len(ids), len(slot), ids.device, torch.float32
    u = None  # (n_live,) uniforms, drawn (n_live, 1) as ``_draw`` draws them for fp32 logits
    if pick and not on.all_greedy:
        u = torch.rand((n, 1), generator=generator, device=device, dtype=f32)[:, 0]
    if pick and not gaps:  # every slot live: the rows' own settings, in slot order
        row_scale, row_greedy = on.scale_f32, on.greedy_u8
        uniform = u if u is not None else torch.zeros(S, dtype=f32, device=device)
    else:  # finished rows and gaps decode greedily; their outputs are dropped
        row_scale = torch.ones(S, dtype=f32, device=device)
        row_greedy = torch.ones(S, dtype=torch.uint8, device=device)
        uniform = torch.zeros(S, dtype=f32, device=device)
        if pick:
            row_scale[slot], row_greedy[slot] = on.scale_f32, on.greedy_u8
            if u is not None:
                uniform[slot] = u
    logits, tok, tok_lp = runner.step(ids, pos, row_scale, row_greedy, uniform)
    if not pick:  # a copy: the step's logits buffer is overwritten by the next step
        return None, logits[slot]
    # the logits are not read again
    return ((tok[slot], tok_lp[slot]) if gaps else (tok, tok_lp)), None


def sample(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    *,
    tokenizer: Any = None,
    compile: bool = False,
    kv_cache: str = "model",
) -> list[Completion]:
    """Sample one completion per prompt (repeat a prompt in ``prompts`` for a group).

    ``params``: one ``SamplingParams`` for all prompts, or one per prompt. ``compile``: the
    fused decoding step; ``kv_cache``: the cache's dtype (both as ``sample_stream``).
    """
    ids: list[list[int]] = [[] for _ in prompts]
    lps: list[list[float]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    for rows, toks, step_lps, ends in _steps(
        model, prompts, params, generator, pad_id, tokenizer, compile, kv_cache
    ):
        for r, t, lp in zip(rows, toks, step_lps):
            ids[r].append(t)
            lps[r].append(lp)
        for r, e in zip(rows, ends or ()):
            if e is not None:
                reasons[r] = e
    return [Completion(i, lp, r) for i, lp, r in zip(ids, lps, reasons)]


@ENGINES.register("torch-eager")
class TorchEngine:
    """Our batched KV-cache sampler behind the ``Engine`` interface, eager torch ops by
    default (``compile=True``: the fused step of ``compiled.py``, on CUDA the step replayed
    from CUDA graphs, ``graphs.py``).

    In-process: it samples from the very module it was given, so ``sync_weights`` with that
    module is a no-op; another module's weights are copied in (a LoRA model's merged).
    """

    decodes_module = True
    """Decodes the module it was given in this process (``sync_weights`` copies weights in)."""
    budget_forcing = True
    """Implements ``SamplingParams.budget`` (s1 budget forcing, ``budget.py``)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any = None,
        *,
        pad_id: int | None = None,
        max_batch_rows: int | None = None,
        compile: bool = False,
        kv_cache: str = "model",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = resolve_pad_id(tokenizer, pad_id)
        self.max_batch_rows = max_batch_rows  # rows decoded together; None: one batch
        self.compile = compile  # the fused decoding step (compiled.py); False: eager
        decoder.kv_cache_dtype(kv_cache, torch.float32)  # a bad name fails here
        self.kv_cache = kv_cache  # the key/value cache's dtype (decoder.KV_CACHE)

    def generate(
        self, requests: Sequence[Request], generator: torch.Generator | None = None
    ) -> list[list[Completion]]:
        prompts = [r.prompt for r in requests for _ in range(r.n)]
        params = [r.params for r in requests for _ in range(r.n)]
        chunk = self.max_batch_rows or max(1, len(prompts))
        flat: list[Completion] = []
        for i in range(0, len(prompts), chunk):
            flat += sample(
                self.model,
                prompts[i : i + chunk],
                params[i : i + chunk],
                generator,
                self.pad_id,
                tokenizer=self.tokenizer,
                compile=self.compile,
                kv_cache=self.kv_cache,
            )
        return per_request(flat, requests)

    def stream(
        self, request: Request, generator: torch.Generator | None = None
    ) -> Iterator[TokenEvent]:
        prompts = [request.prompt] * request.n
        for step in sample_stream(
            self.model,
            prompts,
            request.params,
            generator,
            self.pad_id,
            self.tokenizer,
            self.compile,
            self.kv_cache,
        ):
            for t in step:
                yield TokenEvent(t.row, t.token_id, t.logprob, t.finish_reason)

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        if model is not self.model:  # LoRA adapters are merged into the copied weights
            self.model.load_state_dict(lora.merged_state_dict(model))


@ENGINES.register("torch")
class FusedTorchEngine(TorchEngine):
    """The default engine: our sampler with the fused decoding step (``compiled.py``; on CUDA
    replayed from CUDA graphs, ``graphs.py``), eager after one warning line where it cannot
    run (``--engine torch-eager`` asks for eager).
    ``kv_cache="float16"`` halves the bytes its attention reads (``decoder.KV_CACHE``)."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, **options: Any) -> None:
        options.setdefault("compile", True)
        super().__init__(model, tokenizer, **options)
