"""Trainer-side log-probs of completions, computing each distinct prompt once.

In GRPO every prompt appears G times in a rollout batch. The prompt is run once and only the
completions run on top of its keys and values; gradients through the prompt are the same as
with G full forwards (a test checks it). Two ways to do that:

- packed (Llama/Qwen2/Mistral, the default there): the completions are concatenated into one
  stream with no padding at all, (N, C) with N the number of tokens that predict something
  (each row's last token predicts nothing and is left out). Projections and MLPs run on the
  stream as one matmul each; attention runs over its prompt's keys and its own causal keys: on
  fp32 CPU as one C kernel for the whole stream (``stream_attention``), elsewhere a few rows per
  SDPA call (``_RowBuckets``). A batch of completions of mixed lengths costs
  its real tokens, not rows x the longest (docs/results/performance.md: how much padding
  that saves on GRPO rollouts).
- HF shared prefix (any other decoder, and DDP-wrapped models, whose gradient sync needs the
  wrapper's own forward): the prompt's KV cache is gathered to the rows that share it with a
  differentiable index and the right-padded completions run through the model's forward.

With gradient checkpointing on (and gradients enabled), transformers turns the KV cache off,
so each row then runs prompt + completion in one forward (``_joint_logits``; same values).
Inputs are built on the model's device.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ahamoment import decoder, fused_ops, lora, lora_linear, onednn, stream_attention


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) ids and (N, L) 0/1 mask, each row right-aligned."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, L - len(r) :] = 1
    return ids, mask


def right_pad(
    rows: Sequence[Sequence[int]], pad: int, width: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) ids and (N, L) float mask, each row left-aligned; L is at least ``width``."""
    L = max(width, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L))
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1.0
    return ids, mask


def completion_logprobs(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    temperature: float = 1.0,
    pad_id: int = 0,
    with_entropy: bool = False,
    width: int = 1,
    score_from: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, Lc) of each completion token given its prompt, the (B, Lc) completion
    mask, and optionally the per-token entropy (B, Lc, no grad; 0 at padding). Logits are divided by
    ``temperature`` as in the sampler, so ratios compare like with like. ``width`` pads the
    completion axis to at least that many columns (to line minibatches up with a full batch).
    ``score_from`` (B,): each row's first completion token to score; earlier ones still run
    (as context) but get log-prob 0 and mask 0, and the packed path computes no logits there
    (`aha sft`: the part of a prompt that is not shared)."""
    device = next(model.parameters()).device
    if _checkpointing(model) and torch.is_grad_enabled():
        logits, ids_c, mask = _joint_logits(model, prompts, completions, pad_id, width, device)
        mask = _from_column(mask, score_from)
        return _from_logits(logits, ids_c, mask, temperature, with_entropy)
    lm = _packable(model, prompts, completions)
    if lm is not None:
        return _packed(
            lm, prompts, completions, temperature, pad_id, with_entropy, width, score_from
        )
    logp, mask, ent = _shared_prefix(
        model, prompts, completions, temperature, pad_id, with_entropy, width
    )
    if score_from is None:
        return logp, mask, ent
    mask = _from_column(mask, score_from)
    return logp * mask, mask, None if ent is None else ent * mask


def _from_column(mask: torch.Tensor, score_from: Sequence[int] | None) -> torch.Tensor:
    """``mask`` (B, Lc) with each row's columns before ``score_from`` zeroed."""
    if score_from is None:
        return mask
    start = torch.tensor(score_from, device=mask.device)[:, None]  # (B, 1)
    return mask * (torch.arange(mask.shape[1], device=mask.device)[None] >= start)


def packs(model: torch.nn.Module) -> bool:
    """Whether ``completion_logprobs`` runs ``model`` packed (sequence lengths permitting)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False  # its gradient sync is armed by its own forward
    # peft: the HF model inside, adapters stay in the layers
    return decoder.supports(lora.sampling_model(model))


def _packable(model: torch.nn.Module, prompts, completions) -> torch.nn.Module | None:
    """The HF causal LM to run packed (inside a peft wrapper if any), or None."""
    if not packs(model):
        return None
    lm = lora.sampling_model(model)
    longest = max((len(p) + len(c) for p, c in zip(prompts, completions)), default=0)
    return lm if decoder.fits_window(lm, longest) else None


def _packed(
    lm, prompts, completions, temperature: float, pad_id: int, with_entropy, width, score_from=None
):
    """Packed log-probs (see the module docstring); same returns as ``completion_logprobs``."""
    device = next(lm.parameters()).device
    B = len(prompts)
    uniq: dict[tuple[int, ...], int] = {}
    row_u = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
    ids_p, attn_p = (t.to(device) for t in left_pad(list(uniq), pad_id))  # (U, Lp)
    valid = attn_p.bool()
    pos_p = (attn_p.cumsum(-1) - 1).clamp(min=0)
    hp, keys, values = decoder.prefill(lm, ids_p, pos_p, valid)  # (U, Lp, C), (U, Hkv, Lp, D)

    # the stream: each row's tokens but its last, at positions len(prompt) + j
    lens = [len(c) for c in completions]
    seg = [(i, len(prompts[i]), n - 1) for i, n in enumerate(lens) if n > 1]  # (row, lp, m)
    stream = [t for c in completions if len(c) > 1 for t in c[:-1]]
    pos = [lp + j for _, lp, m in seg for j in range(m)]
    N = len(stream)
    # rounded up with pad tokens that nothing reads: one oneDNN kernel per rounded length
    n_pad = onednn.padded_rows(N) - N
    stream += [pad_id] * n_pad
    pos += [0] * n_pad
    h = lm.model.embed_tokens(
        torch.tensor(stream, dtype=torch.long, device=device)
    )  # (N + n_pad, C)
    cos, sin = lm.model.rotary_emb(h[None], torch.tensor(pos, device=device)[None])
    cos, sin = cos[0], sin[0]  # (N + n_pad, D)
    plan = stream_attention.plan(seg, row_u, valid, N + n_pad, cos, sin)
    rotate = plan is None  # the stream kernels apply RoPE themselves
    if plan is None:
        plan = _RowBuckets(seg, row_u, valid, N, N + n_pad)
    dense = _COMPILED.get(lm)
    for li, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        if dense is not None:  # compile_layers: the same layer, its dense parts compiled
            q, k, v = dense[0](layer, h, cos, sin, rotate)
        else:
            x = fused_ops.rms_norm(layer.input_layernorm, h)
            q, k, v = decoder.qkv(attn, x, cos, sin, rotate)  # (N, H|Hkv, D)
        o = plan.attend(q, k, v, keys[li], values[li], attn.scaling)  # (N, H*D)
        if dense is not None:
            h = dense[1](layer, h, o)
        else:
            h = h + lora_linear.linear(attn.o_proj, o)
            norm = fused_ops.rms_norm(layer.post_attention_layernorm, h)
            h = h + lora_linear.mlp(layer.mlp, norm)

    # predicting positions: each row's prompt end (token 0), then its stream (tokens 1..)
    hid = torch.cat([hp[:, -1], h])  # (U + N, C)
    src, tgt, r_idx, c_idx, s = [], [], [], [], 0
    for i, n in enumerate(lens):
        if n == 0:
            continue
        j0 = 0 if score_from is None else min(score_from[i], n)  # first token scored
        at_j = [row_u[i]] + list(range(len(uniq) + s, len(uniq) + s + n - 1))  # predicts j
        src += at_j[j0:]
        s += n - 1
        tgt += completions[i][j0:]
        r_idx += [i] * (n - j0)
        c_idx += range(j0, n)
    mask = torch.zeros((B, max([width, *lens])), device=device)
    at = tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (r_idx, c_idx))
    mask[at] = 1.0
    n_src = len(src)
    src += [0] * (onednn.padded_rows(n_src) - n_src)  # rounded up, as the stream; dropped below
    hid = fused_ops.rms_norm(lm.model.norm, hid[torch.tensor(src, dtype=torch.long, device=device)])
    logits = lora_linear.linear(lm.lm_head, hid)[:n_src]  # (n_src, V)
    targets = torch.tensor(tgt, dtype=torch.long, device=device)
    return _scatter(logits, targets, at, mask, temperature, with_entropy)


def _call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _dense_in(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: bool):
    """A layer's input norm and q/k/v projections (RoPE applied unless ``rotate`` is False)
    over the stream's hidden states h (N, C), by the model's own modules (peft's LoRA layers
    included): what ``compile_layers`` compiles."""
    x = layer.input_layernorm(h)
    return decoder.qkv(layer.self_attn, x, cos, sin, rotate, project=_call)


def _dense_out(layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of a layer after attention's output o (N, H*D): o_proj and the residual, the
    post-attention norm, the MLP and its residual, by the model's own modules."""
    h = h + layer.self_attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HF model -> (in, out)


def compile_layers(model: torch.nn.Module) -> bool:
    """From now on, run the packed forward of ``model`` (and so its backward) with each
    layer's dense parts under ``torch.compile`` (inductor): the norms, the q/k/v projections
    and RoPE, then o_proj, the MLP and both residuals, as the model's own modules compute
    them (LoRA adapters included); attention between them runs as before (our kernel on fp32
    CPU, SDPA over buckets of rows elsewhere). The token axis is dynamic, so one graph serves
    every stream length and every layer (a forward under no_grad compiles once more). Meant
    for GPUs: on fp32 CPU it replaces our C kernels for these parts and is no faster, slower
    with LoRA adapters, whose merged products it trades for peft's layers
    (docs/results/performance.md). False where ``model`` is not run packed (not a
    Llama/Qwen2/Mistral); a model that DDP wraps afterwards runs its own forward, uncompiled."""
    if not packs(model):
        return False
    lm = lora.sampling_model(model)
    _COMPILED[lm] = (
        torch.compile(_dense_in, dynamic=True),
        torch.compile(_dense_out, dynamic=True),
    )
    return True


class _RowBuckets:
    """Attention of the packed stream, a few rows per call.

    Each row attends to its prompt's keys and, causally, to its own. Rows are sorted by length
    and taken ``BUCKET`` at a time; a bucket is one attention call over (R, H, M, D) queries, M
    its longest row, against (R, Hkv, Lp + M, D) keys: the rows' prompts (left-padded, padding
    masked), then their own stream keys. A short row's padding reads its own first token again:
    as a key it is masked (causally after every real query), as a query its output is dropped,
    so values and gradients are those of one call per row, and the stream is never copied.

    Why buckets of 4: one call per row spends more on per-call work (slices, concatenations
    and their backward) than on arithmetic, and large buckets pay for padding and for a
    masked kernel over longer rows (timings: docs/results/performance.md).

    Every bucket's rows are gathered by one ``index_select`` per tensor and layer, then split:
    a gather per bucket makes its backward write a zero-filled gradient of the whole stream per
    bucket and sum them all (``GATHER_ONCE = False``, kept for ``bench/train_step.py``).
    """

    BUCKET = 4
    GATHER_ONCE = True

    def __init__(self, seg, row_u, valid: torch.Tensor, N: int, n_out: int | None = None) -> None:
        """seg: (row, prompt length, stream tokens) of each row in stream order; row_u: each
        row's prompt in ``valid`` (U, Lp), the prompts' key mask; N: the stream's length;
        n_out: rows of ``attend``'s output (N by default; rows from N on are padding, their
        output any row's)."""
        device = valid.device
        start, s = [], 0
        for _, _, m in seg:
            start.append(s)
            s += m
        order = sorted(range(len(seg)), key=lambda r: -seg[r][2])
        self.buckets = []  # (R, M, (R, 1, M, Lp+M) mask) per bucket
        back = [0] * (N if n_out is None else n_out)  # stream position -> bucket output row
        at = 0
        flat_all, u_all = [], []
        for b in range(0, len(order), self.BUCKET):
            rows = order[b : b + self.BUCKET]
            M = seg[rows[0]][2]
            flat = []
            for i, r in enumerate(rows):
                m = seg[r][2]
                flat += [*range(start[r], start[r] + m), *[start[r]] * (M - m)]
                back[start[r] : start[r] + m] = range(at + i * M, at + i * M + m)
            at += len(rows) * M
            u = torch.tensor([row_u[seg[r][0]] for r in rows], device=device)
            causal = torch.ones((M, M), dtype=torch.bool, device=device).tril()
            mask = torch.cat(
                [valid[u][:, None, :].expand(-1, M, -1), causal.expand(len(rows), -1, -1)], -1
            )[:, None]
            self.buckets.append((len(rows), M, mask))
            flat_all += flat
            u_all.append(u)
        self.back = torch.tensor(back, dtype=torch.long, device=device)
        self.flat = torch.tensor(flat_all, dtype=torch.long, device=device)  # (sum R*M,)
        self.u = torch.cat(u_all) if u_all else torch.zeros(0, dtype=torch.long, device=device)
        self.sizes = [R * M for R, M, _ in self.buckets]  # stream rows per bucket
        self.counts = [R for R, _, _ in self.buckets]  # rows (prompts) per bucket

    def attend(self, q, k, v, keys_p, values_p, scale: float) -> torch.Tensor:
        """q (n_out, H, D), k and v (n_out, Hkv, D) of the stream; keys_p and values_p (U, Hkv,
        Lp, D) of the prompts. Returns the attention output (n_out, H*D), heads in model order."""
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
        if not self.buckets:
            return q.new_zeros((0, H * D))
        outs = []
        sizes, counts = self.sizes, self.counts
        if self.GATHER_ONCE:
            qs, ks, vs = (t.index_select(0, self.flat).split(sizes) for t in (q, k, v))
            kps, vps = (t.index_select(0, self.u).split(counts) for t in (keys_p, values_p))
        else:
            flats, us = self.flat.split(sizes), self.u.split(counts)
            qs, ks, vs = ([t.index_select(0, f) for f in flats] for t in (q, k, v))
            kps, vps = ([t.index_select(0, u) for u in us] for t in (keys_p, values_p))
        for (R, M, mask), *parts in zip(self.buckets, qs, ks, vs, kps, vps):
            qb, kb, vb = (t.view(R, M, -1, D).transpose(1, 2) for t in parts[:3])
            kpb, vpb = parts[3:]  # (R, Hkv, Lp, D): the rows' prompts
            o = F.scaled_dot_product_attention(
                qb,
                torch.cat([kpb, kb], dim=2),  # (R, Hkv, Lp + M, D)
                torch.cat([vpb, vb], dim=2),
                attn_mask=mask,
                scale=scale,
                enable_gqa=Hkv != H,
            )  # (R, H, M, D): 4-d inputs take the fused CPU kernel
            outs.append(o.transpose(1, 2).reshape(R * M, H * D))
        return torch.cat(outs).index_select(0, self.back)


def _shared_prefix(
    model, prompts, completions, temperature: float, pad_id: int, with_entropy, width
):
    """HF forward: the prompts' KV cache gathered to their rows, then the padded completions."""
    device = next(model.parameters()).device
    uniq: dict[tuple[int, ...], int] = {}
    row_prompt = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
    ids_p, attn_p = (t.to(device) for t in left_pad(list(uniq), pad_id))  # (U, Lp)
    pos_p = (attn_p.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids_p, attention_mask=attn_p, position_ids=pos_p, use_cache=True)
    idx = torch.tensor(row_prompt, device=device)
    # transformers >= 5.2x names the KV cache ``cache`` (output and argument), earlier 5.x
    # ``past_key_values``; the prompt forward's output says which this one is
    key = "cache" if hasattr(out, "cache") else "past_key_values"
    cache = getattr(out, key)
    cache.batch_select_indices(idx)  # (U, ...) -> (B, ...), differentiable gather
    first_logits = out.logits[idx, -1]  # (B, V): predicts each completion's first token

    ids_c, mask = (t.to(device) for t in right_pad(completions, pad_id, width))  # (B, Lc)
    B, Lc = ids_c.shape
    attn = torch.cat([attn_p[idx], torch.ones((B, Lc), dtype=torch.long, device=device)], dim=1)
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)
    pos_c = prompt_len[:, None] + torch.arange(Lc, device=device)[None, :]  # (B, Lc)
    out_c = model(input_ids=ids_c, attention_mask=attn, position_ids=pos_c, **{key: cache})
    # logits at completion position j-1 predict token j; the prompt's last logits predict token 0
    logits = torch.cat([first_logits[:, None], out_c.logits[:, :-1]], dim=1)  # (B, Lc, V)
    return _from_logits(logits, ids_c, mask, temperature, with_entropy)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Gradient checkpointing on and in training mode (the KV cache is then unavailable)."""
    inner = getattr(model, "module", model)  # DDP
    # transformers 5.2x renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    on = getattr(inner, "is_activation_checkpointing", None)
    if on is None:
        on = getattr(inner, "is_gradient_checkpointing", False)
    return bool(on) and inner.training


def _joint_logits(model, prompts, completions, pad_id: int, width: int, device):
    """Logits (B, Lc, V) of each completion token from one forward over prompt + completion."""
    ids_c, mask = (t.to(device) for t in right_pad(completions, pad_id, width))  # (B, Lc)
    B, Lc = ids_c.shape
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    ids, attn = (t.to(device) for t in right_pad(rows, pad_id))  # (B, L), right-padded
    pos = torch.arange(ids.shape[1], device=device).expand(B, -1)  # (B, L)
    out = model(input_ids=ids, attention_mask=attn.long(), position_ids=pos, use_cache=False)
    # position len(p) + j - 1 predicts completion token j; padding columns read any position
    prompt_len = torch.tensor([len(p) for p in prompts], device=device)
    at = (prompt_len[:, None] - 1 + torch.arange(Lc, device=device)[None, :]).clamp(
        max=ids.shape[1] - 1
    )  # (B, Lc)
    logits = out.logits.gather(1, at[..., None].expand(-1, -1, out.logits.shape[-1]))
    return logits, ids_c, mask


def _from_logits(logits, ids_c, mask, temperature: float, with_entropy: bool):
    """Padded logits (B, Lc, V): log-probs taken at the real tokens only."""
    at = mask.bool().nonzero(as_tuple=True)
    return _scatter(logits[at], ids_c[at], at, mask, temperature, with_entropy)


def _scatter(logits, targets, at, mask, temperature: float, with_entropy: bool):
    """Log-probs of ``targets`` (T,) under ``logits`` (T, V) / temperature, placed at ``at``
    (row, column index tensors) in (B, Lc) zeros like ``mask``; the entropy there likewise
    (no grad), or None. Returns (logp, mask, entropy)."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (T, V)
    picked = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (T,)
    logp = torch.zeros(mask.shape, dtype=logp_all.dtype, device=mask.device).index_put(at, picked)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            lp = logp_all.detach()
            entropy = torch.zeros_like(logp).index_put(at, -(lp.exp() * lp).sum(-1))
    return logp, mask, entropy


def completion_logprobs_full(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    temperature: float = 1.0,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one full forward per row, no sharing and no padding. Used by tests."""
    _, mask = right_pad(completions, pad_id)
    rows = []
    for p, c in zip(prompts, completions):
        if not c:
            rows.append(torch.zeros(mask.shape[1]))
            continue
        ids = torch.tensor([list(p) + list(c)])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float() / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        rows.append(torch.cat([lp, torch.zeros(mask.shape[1] - len(c))]))
    logp = torch.stack(rows)
    return logp, mask
