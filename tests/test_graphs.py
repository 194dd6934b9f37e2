"""The fixed-shape decoding step that CUDA graphs replay (rollout/graphs.py), run eagerly on CPU
against the eager step (sampler._LlamaLike): the same tokens, log-probs to float rounding,
through slot buckets, window widths and buffers kept across decodes. The capture itself
needs a GPU: the last test runs it only where CUDA is available."""

from __future__ import annotations

import gc

import pytest
import torch

from ahamoment.logprobs import left_pad
from ahamoment.models import new_model
from ahamoment.rollout import compiled, graphs, sampler
from ahamoment.rollout.sampler import SamplingParams, sample
from test_compiled_decode import _assert_same, _both, _prompts  # eager-vs-compiled helpers


@pytest.fixture
def static_step(monkeypatch):
    """``compile=True`` decodes with StaticLlama on CPU (no capture); records each step's
    (slots, width) and each decode's bucket dict (not the runner: a live runner holds its
    model's kept buffers)."""
    seen: list[tuple[int, int]] = []
    kepts: list[dict] = []
    forward, start = graphs.StaticLlama._forward, graphs.StaticLlama.start

    def spy(self, b, W):
        seen.append((len(b.ids), W))
        return forward(self, b, W)

    def spy_start(self, row_prompt, max_new):
        slots = start(self, row_prompt, max_new)
        kepts.append(self.kept)
        return slots

    monkeypatch.setattr(graphs.StaticLlama, "_forward", spy)
    monkeypatch.setattr(graphs.StaticLlama, "start", spy_start)
    monkeypatch.setattr(sampler, "_compiled_runner", graphs.graphed_runner)
    return seen, kepts


def test_bucket_by_hand():
    assert [graphs.bucket(n, 8) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert graphs.bucket(65, 64) == 128 and graphs.bucket(3, 1) == 4


def test_rows_retire_through_smaller_buckets_and_wider_windows(gqa_model, static_step):
    # 40 rows (bucket 64) end between 2 and 80 tokens: the live rows move to 32, 16 and 8
    # slots while the window of completion columns widens from 64 to all 80
    seen, _ = static_step
    prompts = [
        p for p in _prompts(10, gqa_model.config.vocab_size, seed=1, hi=30) for _ in range(4)
    ]
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=2 + 2 * i, stop_ids=(9,))
        for i in range(len(prompts))
    ]
    eager, static = _both(gqa_model, prompts, params, seed=4)
    _assert_same(eager, static)
    slots = [s for s, _ in seen]
    assert slots[0] == 64 and slots == sorted(slots, reverse=True)
    assert {8, 16, 32} <= set(slots)
    assert {w for _, w in seen} == {64, 80}  # capped at the width, T = 80
    assert len({len(c.ids) for c in static}) > 10


def test_greedy_and_sampled_rows_and_a_half_cache(gqa_model, static_step):
    prompts = _prompts(6, gqa_model.config.vocab_size, seed=2)
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 0.7, max_new_tokens=20)
        for i in range(len(prompts))
    ]
    _assert_same(*_both(gqa_model, prompts, params, seed=5))
    _assert_same(*_both(gqa_model, prompts, params, seed=5, kv_cache="float16"))


def test_buffers_are_kept_across_decodes_and_dropped_when_weights_move(gqa_model, static_step):
    _, kepts = static_step
    model = gqa_model
    prompts = _prompts(5, model.config.vocab_size, seed=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    _assert_same(*_both(model, prompts, params, seed=6))
    first = kepts[-1][8]
    # another decode of the same width and rounded prompt length reuses the buffers, whose
    # stale columns are masked: the same rows as a fresh runner's
    prompts2 = _prompts(5, model.config.vocab_size, seed=4)
    _assert_same(*_both(model, prompts2, params, seed=7))
    assert kepts[-1][8] is first
    # a replaced parameter (not updated in place) drops them
    emb = model.model.embed_tokens
    old = emb.weight
    emb.weight = torch.nn.Parameter(old.detach().clone())
    try:
        _assert_same(*_both(model, prompts2, params, seed=7))
        assert kepts[-1][8] is not first
    finally:
        emb.weight = old
        if model.config.tie_word_embeddings:
            model.tie_weights()


def test_large_buffers_are_freed_when_their_decode_ends(gqa_model, static_step, monkeypatch):
    _, kepts = static_step
    monkeypatch.setattr(graphs, "KEEP_BYTES", 0)
    sample(gqa_model, _prompts(3, gqa_model.config.vocab_size), SamplingParams(max_new_tokens=4),
           torch.Generator().manual_seed(0), compile=True)  # fmt: skip
    gc.collect()
    assert kepts[-1] == {}


def test_a_second_decode_at_once_gets_buffers_of_its_own(gqa_model):
    prompts = _prompts(3, gqa_model.config.vocab_size)
    with torch.no_grad():
        first, second = (graphs.StaticLlama(gqa_model, capture=False) for _ in range(2))
        for r in (first, second):
            ids, mask = left_pad(prompts, 0)
            valid = mask.bool()
            r.forward(ids, (valid.long().cumsum(-1) - 1).clamp(min=0), valid)
            r.start(torch.arange(3), 4)
    assert first.kept is graphs._KEPT[gqa_model].buckets
    assert second.kept is not first.kept
    del first
    gc.collect()
    assert graphs._KEPT[gqa_model].lock.acquire(blocking=False)  # released with its decode
    graphs._KEPT[gqa_model].lock.release()


def test_step_past_the_cache_width_is_refused(gqa_model):
    runner = graphs.StaticLlama(gqa_model, capture=False)
    ids = torch.tensor([[11, 12, 13]])
    with torch.no_grad():
        runner.forward(ids, torch.arange(3)[None], torch.ones_like(ids, dtype=torch.bool))
        runner.start(torch.tensor([0]), 1)
        runner.step(torch.full((8,), 5), torch.full((8,), 3))
        with pytest.raises(RuntimeError, match="past the cache's 1 columns"):
            runner.step(torch.full((8,), 5), torch.full((8,), 4))


def test_unsupported_model_decodes_eagerly_with_one_warning(gqa_model, monkeypatch):
    monkeypatch.setattr(compiled, "_warned", set())
    monkeypatch.setattr(gqa_model.model.rotary_emb, "rope_type", "dynamic", raising=False)
    with pytest.warns(RuntimeWarning, match="CUDA graphs off.*dynamic"):
        assert graphs.graphed_runner(gqa_model, 64) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_step_matches_eager_on_cuda(gqa_model):
    model = new_model(gqa_model.config, seed=3).eval().cuda()
    prompts = [p for p in _prompts(10, model.config.vocab_size, seed=1, hi=30) for _ in range(4)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=2 + 2 * i) for i in range(40)]
    eager = sample(model, prompts, params, torch.Generator("cuda").manual_seed(4))
    graphed = sample(model, prompts, params, torch.Generator("cuda").manual_seed(4), compile=True)
    _assert_same(eager, graphed)
