"""Attention of the trainer's packed stream in two C kernels, forward and backward.

In the packed log-probs (``logprobs.py``) each sequence's stream rows attend to its prompt's
keys, then causally to its own. ``logprobs._RowBuckets`` runs that as torch's fused SDPA over
buckets of 4 rows: rows padded to the bucket's longest, the prompts' keys gathered and
concatenated to each bucket's own, a boolean mask per bucket, and the backward of all those
gathers and concatenations. With small heads and short rows that plumbing and SDPA's per-call
work outweigh the arithmetic (docs/results/performance.md has the profile).

Here one call covers the whole stream: ``stream_attn_fwd`` walks each (sequence, kv head), reads
the prompt's valid keys and the sequence's own in place, applies RoPE to the stream's queries
and keys itself (HF's rotate-half formula with the model's own cos/sin tables, so the eight
elementwise ops of ``apply_rotary_pos_emb`` and their backward never run), and keeps each
row's log-sum-exp; ``stream_attn_bwd`` recomputes the probabilities from it (as flash attention
does) and writes the gradients of the queries and keys (through RoPE's transpose), of the
stream's values, and of the prompts' keys and values (summed over the sequences that share a
prompt). No padding is computed on, nothing is concatenated. Tasks are (prompt, kv head) pairs
in the backward, so results do not depend on the thread count. The kernels are the trainer's
library built by ``rollout/compiled.py`` (``kernels(part="train")``, one build per machine).

Values are RoPE then SDPA's up to float rounding (each kernel sums in its own order;
``tests/test_fused_ops.py`` checks values and gradients against float64). Where the kernels
cannot run (not fp32 on CPU, CPU autocast on, no C compiler), ``plan`` returns None and the
buckets run.
"""

from __future__ import annotations

import torch
from torch import Tensor

ENABLED = True
"""False: the packed stream's attention runs as SDPA over buckets (``logprobs._RowBuckets``);
``bench/train_step.py --compare attention`` flips it."""


class StreamPlan:
    """Where each sequence's stream rows are, and which prompt each reads.

    seg: (row, prompt length, stream tokens) per sequence, in stream order (``logprobs``);
    row_u: each row's prompt index into ``valid`` (U, Lp), the prompts' left-padded key mask;
    n_out: rows of the stream, padding included (their output is 0); cos, sin (n_out, D): the
    stream rows' rotary tables (``model.rotary_emb``)."""

    def __init__(self, lib, seg, row_u, valid: Tensor, n_out: int, cos: Tensor, sin: Tensor):
        self.lib, self.n_out = lib, n_out
        self.cos, self.sin = cos.detach().contiguous(), sin.detach().contiguous()
        self.U, self.Lp = valid.shape
        table, start = [], 0
        for row, _, m in seg:
            table.append((start, m, row_u[row]))
            start += m
        self.seg = torch.tensor(table, dtype=torch.long).reshape(-1, 3)  # (R, 3)
        order = sorted(range(len(table)), key=lambda r: table[r][2])  # by prompt, stable
        self.order = torch.tensor(order, dtype=torch.long)
        per_u = torch.bincount(self.seg[:, 2], minlength=self.U)
        self.uoff = torch.cat([per_u.new_zeros(1), per_u.cumsum(0)])  # (U + 1,)
        # left-padded: a prompt's valid keys are its last ones
        self.pstart = (self.Lp - valid.sum(-1)).to(torch.long).cpu()  # (U,)
        self.longest = self.Lp + max((m for _, m, _ in table), default=0)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keys_p, values_p, scale: float) -> Tensor:
        """``_RowBuckets.attend``'s contract, but q (n_out, H, D) and k (n_out, Hkv, D) come
        before RoPE; v (n_out, Hkv, D); keys_p and values_p (U, Hkv, Lp, D), the prompts' (keys
        rotated). Returns (n_out, H*D), heads in model order."""
        o = _Attention.apply(q, k, v, keys_p, values_p, self, float(scale))
        return o.flatten(1)

    def scratch(self, like: Tensor, D: int, n_threads: int) -> tuple[Tensor, int]:
        per = self.lib.stream_attn_per_thread(self.longest, D)  # floats per thread
        return like.new_empty(n_threads * per), per


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kp, vp, plan: StreamPlan, scale: float):
        from ahamoment.rollout import compiled

        q, k, v, kp, vp = (t.contiguous() for t in (q, k, v, kp, vp))
        N, H, D = q.shape
        Hkv = k.shape[1]
        lib = plan.lib
        n_threads = compiled.threads(lib)
        scratch, per = plan.scratch(q, D, n_threads)
        o = q.new_zeros((N, H, D))  # rows no sequence holds (padding) stay 0
        lse = q.new_zeros((N, H))
        lib.stream_attn_fwd(
            _ptr(q), _ptr(k), _ptr(v), _ptr(plan.cos), _ptr(plan.sin), _ptr(kp), _ptr(vp),
            _ptr(plan.seg), _ptr(plan.pstart),
            _ptr(o), _ptr(lse), _ptr(scratch), per, n_threads, plan.seg.shape[0], H, Hkv, D,
            plan.Lp, scale,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, kp, vp, o, lse)
        ctx.plan, ctx.scale = plan, scale
        return o

    @staticmethod
    def backward(ctx, go):
        from ahamoment.rollout import compiled

        q, k, v, kp, vp, o, lse = ctx.saved_tensors
        plan = ctx.plan
        go = go.contiguous()
        N, H, D = q.shape
        Hkv = k.shape[1]
        lib = plan.lib
        n_threads = compiled.threads(lib)
        scratch, per = plan.scratch(q, D, n_threads)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
        lib.stream_attn_bwd(
            _ptr(q), _ptr(k), _ptr(v), _ptr(plan.cos), _ptr(plan.sin), _ptr(kp), _ptr(vp),
            _ptr(o), _ptr(lse), _ptr(go),
            _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dkp), _ptr(dvp), _ptr(plan.seg),
            _ptr(plan.order), _ptr(plan.uoff), _ptr(plan.pstart), _ptr(scratch), per,
            n_threads, plan.U, H, Hkv, D, plan.Lp, ctx.scale,
        )  # fmt: skip
        return dq, dk, dv, dkp, dvp, None, None


def plan(seg, row_u, valid: Tensor, n_out: int, cos: Tensor, sin: Tensor) -> StreamPlan | None:
    """A plan for the kernels (``StreamPlan``'s arguments), or None where they cannot run:
    ``cos`` not fp32 on CPU or not (n_out, even D), CPU autocast on, or no kernels."""
    if not ENABLED or cos.device.type != "cpu" or cos.dtype != torch.float32:
        return None
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != n_out or cos.shape[1] % 2:
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    from ahamoment.rollout import compiled

    try:
        lib = compiled.kernels(cos.shape[1], "train")
    except RuntimeError:
        return None
    return StreamPlan(lib, seg, row_u, valid, n_out, cos, sin)
