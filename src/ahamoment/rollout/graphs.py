"""The torch engine's decoding step on CUDA, replayed from CUDA graphs (``compile=True`` there).

A small model's eager decoding step on a GPU is bound by kernel launches, not arithmetic: a
few dozen per layer, each a few microseconds of CPU time, for a step whose arithmetic takes
less. A CUDA graph records the step's kernels once and replays them with one launch. That
needs fixed shapes and fixed memory, so this step differs from ``sampler._LlamaLike`` in how it
holds its state (the arithmetic is the same, up to float rounding):

- **slots in buckets.** The batch has S slots, S a power of two (at least ``MIN_SLOTS``);
  when at most half are live the live rows move to the next smaller bucket (``retire``).
  Finished rows and empty slots decode a pad token whose output is dropped, as in the eager
  step's gaps.
- **a cache of fixed width.** Each bucket holds keys and values (L, S, Hkv, T, D) for T = the
  decode's longest completion, and its own copy of each slot's prompt keys (L, S, Hkv, Lp, D),
  Lp rounded up to a multiple of ``PROMPT_ROUND`` (left padding masked). The token of step t is
  written at column t by ``index_copy_`` from a one-element device tensor, so one graph serves
  every t.
- **a window of columns.** Attention reads the first W completion columns, W a power of two
  (at least ``MIN_WIDTH``) covering t, so early steps do not read the whole width; one graph
  per (S, W) met, captured the first time (a warm-up run on a side stream, then the capture).

Graphs and buffers are kept with the model (up to ``KEEP_BYTES``) and reused by the next decode
of the same width T and rounded prompt length (GRPO's rollouts, step after step); a decode that
starts while another one of the same model runs gets buffers of its own. They read the weights where they
were when captured: weights updated in place (an optimizer step, ``load_state_dict``) are seen
by the next replay; if a parameter is replaced by another tensor, every graph is dropped and
captured again. Off CUDA (tests) the same step runs eagerly. Never run on a GPU in this
project's sessions (none was lent): the step's arithmetic is tested on CPU against the eager
step; the capture and replay are written against torch's documented API
(``torch.cuda.CUDAGraph``, ``torch.cuda.graph``) and have not run.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from ahamoment import decoder
from ahamoment.lora_linear import linear, mlp
from ahamoment.rollout import compiled

MIN_SLOTS = 8
"""The smallest slot bucket."""
MIN_WIDTH = 64
"""The narrowest window of completion columns attention reads."""
PROMPT_ROUND = 64
"""Prompt columns are rounded up to a multiple of this, so prompts of similar length share
buffers and graphs."""
KEEP_BYTES = 2 << 30
"""Buffers (and so graphs) outlive their decode only while they take at most this many bytes:
a larger cache is freed for the trainer when its decode ends."""


def bucket(n: int, least: int) -> int:
    """The smallest power of two >= max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


@dataclass
class _Bucket:
    """One slot bucket's fixed buffers and its graphs, by window width."""

    ids: torch.Tensor  # (S,) the step's tokens
    pos: torch.Tensor  # (S,) their positions
    t: torch.Tensor  # (1,) the column they are written at
    k: torch.Tensor  # (L, S, Hkv, T, D) completion keys
    v: torch.Tensor
    kp: torch.Tensor  # (L, S, Hkv, Lp, D) each slot's prompt keys, left-padded
    vp: torch.Tensor
    pbias: torch.Tensor  # (S, 1, 1, Lp): 0 on a prompt's columns, -inf on its padding
    graphs: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)  # W -> (graph, out)


@dataclass
class _Kept:
    """A model's buckets kept between decodes, for one decode at a time (``lock``)."""

    key: tuple = ()  # (T, Lp, kv dtype, parameter addresses) they were made for
    buckets: dict[int, _Bucket] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Kept


class StaticLlama:
    """A Llama/Qwen2/Mistral decoding step of fixed shapes, replayed from CUDA graphs on CUDA
    (see the module docstring); ``sampler._decode`` drives it as it drives ``_LlamaLike``:
    ``forward`` (the prefill), ``start``, ``step``, ``retire`` and ``size``."""

    def __init__(self, model: PreTrainedModel, kv_cache: str = "model", capture: bool = True):
        self.model = model
        self.layers = model.model.layers
        cfg = model.config
        attn = self.layers[0].self_attn
        self.D, self.H, self.Hkv = attn.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.kv_dtype = decoder.kv_cache_dtype(kv_cache, self.dtype)
        self.capture = capture and self.device.type == "cuda"
        self.S = 0
        self.cur: _Bucket | None = None
        self.tcol = 0  # completion columns filled

    def prefill(self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids, pos, valid: (U, Lp) left-padded prompts; returns last-position logits (U, V)."""
        h, keys, values = decoder.prefill(self.model, ids, pos, valid, self.kv_dtype)
        self.kp0 = torch.stack(keys).to(self.kv_dtype)  # (L, U, Hkv, Lp, D)
        self.vp0 = torch.stack(values).to(self.kv_dtype)
        self.valid0 = valid
        return linear(self.model.lm_head, self.model.model.norm(h[:, -1]))

    forward = prefill

    @property
    def size(self) -> int:
        return self.S

    def start(self, row_prompt: torch.Tensor, max_new: int) -> torch.Tensor:
        """Slots for rows of prompts ``row_prompt`` (B,): rows 0..B-1 in slots 0..B-1 of the
        smallest bucket that holds them."""
        self.T, self.tcol = max(1, max_new), 0
        lp = self.kp0.shape[3]
        self.Lp = -(-lp // PROMPT_ROUND) * PROMPT_ROUND
        kept = _KEPT.setdefault(self.model, _Kept())
        if kept.lock.acquire(blocking=False):  # released when this decode's runner is gone
            weakref.finalize(self, _release, kept)
        else:  # another decode of this model holds them: buffers of its own
            kept = _Kept()
        key = (self.T, self.Lp, self.kv_dtype, tuple(p.data_ptr() for p in self.model.parameters()))
        if kept.key != key:  # another width or prompt length, or weights moved: new buffers
            kept.buckets.clear()
            kept.key = key
        self.kept = kept.buckets
        n = len(row_prompt)
        self._enter(bucket(n, MIN_SLOTS))
        b = self.cur
        assert b is not None
        pick = torch.zeros(self.S, dtype=torch.long, device=self.device)  # empty slots: prompt 0
        pick[:n] = row_prompt
        b.kp.zero_()
        b.vp.zero_()
        b.kp[:, :, :, self.Lp - lp :] = self.kp0[:, pick]  # right-aligned, as the prefill's
        b.vp[:, :, :, self.Lp - lp :] = self.vp0[:, pick]
        valid = torch.zeros((self.S, self.Lp), dtype=torch.bool, device=self.device)
        valid[:, self.Lp - lp :] = self.valid0[pick]
        b.pbias.copy_(self._pbias(valid))
        return torch.arange(n, device=self.device)

    def _pbias(self, valid: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros(valid.shape, dtype=self.dtype, device=self.device)
        return bias.masked_fill(~valid, float("-inf"))[:, None, None, :]  # (S, 1, 1, Lp)

    def _enter(self, S: int) -> None:
        """Make bucket S current, with buffers kept from an earlier decode when it had one."""
        b = self.kept.get(S)
        if b is None:
            L, dev, kv = len(self.layers), self.device, self.kv_dtype
            zeros = torch.zeros
            b = _Bucket(
                ids=zeros(S, dtype=torch.long, device=dev),
                pos=zeros(S, dtype=torch.long, device=dev),
                t=zeros(1, dtype=torch.long, device=dev),
                k=zeros((L, S, self.Hkv, self.T, self.D), dtype=kv, device=dev),
                v=zeros((L, S, self.Hkv, self.T, self.D), dtype=kv, device=dev),
                kp=zeros((L, S, self.Hkv, self.Lp, self.D), dtype=kv, device=dev),
                vp=zeros((L, S, self.Hkv, self.Lp, self.D), dtype=kv, device=dev),
                pbias=zeros((S, 1, 1, self.Lp), dtype=self.dtype, device=dev),
            )
            self.kept[S] = b
        self.cur, self.S = b, S

    def retire(self, slot: torch.Tensor) -> torch.Tensor | None:
        """Only the rows at ``slot`` (n,) go on: when a smaller bucket holds them they move
        there (slots 0..n-1, returned); otherwise None (finished rows ride along)."""
        n = len(slot)
        S = bucket(n, MIN_SLOTS)
        if S >= self.S:
            return None
        old = self.cur
        assert old is not None
        self._enter(S)
        new = self.cur
        assert new is not None
        pick = torch.zeros(S, dtype=torch.long, device=self.device)
        pick[:n] = slot
        for name in ("kp", "vp", "pbias"):
            dim = 1 if name != "pbias" else 0
            getattr(new, name).copy_(getattr(old, name).index_select(dim, pick))
        w = self.tcol  # completion columns written so far
        new.k[:, :, :, :w] = old.k[:, pick, :, :w]
        new.v[:, :, :, :w] = old.v[:, pick, :, :w]
        return torch.arange(n, device=self.device)

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, pos: (S,) one token per slot; returns logits (S, V), a buffer the next step
        overwrites."""
        b = self.cur
        assert b is not None
        if self.tcol >= self.T:
            raise RuntimeError(f"decoding past the cache's {self.T} columns")
        b.ids.copy_(ids)
        b.pos.copy_(pos)
        b.t.fill_(self.tcol)
        W = min(self.T, bucket(self.tcol + 1, MIN_WIDTH))
        self.tcol += 1
        if not self.capture:
            return self._forward(b, W)
        got = b.graphs.get(W)
        if got is None:
            try:
                got = b.graphs[W] = self._capture(b, W)
            except RuntimeError as e:  # a module that cannot be captured: eager from now on
                compiled._warn_once(str(e), "CUDA graphs")
                self.capture = False
                return self._forward(b, W)
        graph, out = got
        graph.replay()
        return out

    def _capture(self, b: _Bucket, W: int) -> tuple[Any, torch.Tensor]:
        """A graph of ``_forward(b, W)`` and its output buffer. The warm-up run writes the
        step's keys and values at column t, as the replay that follows writes them again."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(b, W)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._forward(b, W)
        return graph, out

    def _forward(self, b: _Bucket, W: int) -> torch.Tensor:
        """One step over bucket ``b``'s slots, attention over its first W completion columns;
        only fixed-shape ops whose arguments live on the device (capturable)."""
        S, Hkv, D = len(b.ids), self.Hkv, self.D
        rep = self.H // Hkv
        inner = self.model.model
        dt = self.dtype
        h = inner.embed_tokens(b.ids[:, None])  # (S, 1, C)
        cos, sin = inner.rotary_emb(h, b.pos[:, None])
        cols = torch.arange(W, device=self.device)
        written = torch.zeros(W, dtype=dt, device=self.device).masked_fill(cols > b.t, -torch.inf)
        bias = torch.cat([b.pbias, written.expand(S, 1, 1, W)], dim=-1)  # (S, 1, 1, Lp + W)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = decoder.qkv(attn, layer.input_layernorm(h), cos, sin)  # (S, 1, H|Hkv, D)
            b.k[li].index_copy_(2, b.t, k.transpose(1, 2).to(self.kv_dtype))  # (S, Hkv, 1, D)
            b.v[li].index_copy_(2, b.t, v.transpose(1, 2).to(self.kv_dtype))
            keys = torch.cat([b.kp[li], b.k[li, :, :, :W]], dim=2).to(dt)  # (S, Hkv, Lp + W, D)
            values = torch.cat([b.vp[li], b.v[li, :, :, :W]], dim=2).to(dt)
            # head h uses kv head h // rep: (S, Hkv, rep, D)
            qg = q.reshape(S, Hkv, rep, D) * attn.scaling
            s = qg @ keys.transpose(-1, -2) + bias  # (S, Hkv, rep, Lp + W)
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(dt)
            o = (p @ values).reshape(S, 1, -1)  # (S, 1, H*D), heads in model order
            h = h + linear(attn.o_proj, o)
            h = h + mlp(layer.mlp, layer.post_attention_layernorm(h))
        return linear(self.model.lm_head, inner.norm(h[:, 0]))


def graphed_runner(
    model: PreTrainedModel, max_len: int, kv_cache: str = "model"
) -> StaticLlama | None:
    """The graphed step for ``model`` on CUDA, or None (eager) after one warning line where
    it cannot run."""
    reason = compiled.shape_unsupported(model, max_len)
    if reason is None:
        return StaticLlama(model, kv_cache)
    compiled._warn_once(reason, "CUDA graphs")
    return None


def _release(kept: _Kept) -> None:
    """A decode's end: its buffers and graphs stay for the next one unless they take more
    than ``KEEP_BYTES``."""
    held = kept.buckets.values()
    size = sum(t.numel() * t.element_size() for b in held for t in (b.k, b.v, b.kp, b.vp))
    if size > KEEP_BYTES:
        kept.buckets.clear()
        kept.key = ()
    kept.lock.release()
