"""The KV-cache sampler against independent references: HF generate and a full forward."""

import random

import pytest
import torch

from ahamoment.rollout import sampler as S
from ahamoment.rollout.sampler import SamplingParams, _filter_logits, sample


def _prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(7, vocab) for _ in range(rng.randint(5, 14))] for _ in range(n)]


def test_greedy_matches_hf_generate_with_mixed_prompt_lengths(tiny_model):
    prompts = _prompts(6, tiny_model.config.vocab_size)
    outs = sample(tiny_model, prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
    for p, o in zip(prompts, outs):
        ref = tiny_model.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, len(p) :].tolist()
        assert o.ids == ref
        assert o.finish_reason == "length"


def test_logprobs_match_a_teacher_forced_forward(tiny_model):
    prompts = _prompts(4, tiny_model.config.vocab_size, seed=1)
    gen = torch.Generator().manual_seed(0)
    outs = sample(tiny_model, prompts, SamplingParams(temperature=0.7, max_new_tokens=8), gen)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p + o.ids])
        with torch.no_grad():
            logits = tiny_model(ids).logits[0, len(p) - 1 : -1] / 0.7
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(o.ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-5, rtol=1e-5)


def test_stop_ids_retire_rows_and_are_kept(tiny_model):
    prompts = _prompts(8, tiny_model.config.vocab_size, seed=2)
    free = sample(tiny_model, prompts, SamplingParams(temperature=0.0, max_new_tokens=10))
    stop = free[0].ids[3]  # the 4th greedy token of row 0 becomes a stop id
    outs = sample(
        tiny_model, prompts, SamplingParams(temperature=0.0, max_new_tokens=10, stop_ids=(stop,))
    )
    for f, o in zip(free, outs):
        if stop in f.ids:
            cut = f.ids.index(stop) + 1
            assert o.ids == f.ids[:cut] and o.finish_reason == "stop"
        else:
            assert o.ids == f.ids and o.finish_reason == "length"


def test_fast_path_equals_transformers_cache_path(tiny_model, monkeypatch):
    prompts = _prompts(5, tiny_model.config.vocab_size, seed=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, stop_ids=(9, 10, 11))
    fast = sample(tiny_model, prompts, params, torch.Generator().manual_seed(5))
    monkeypatch.setattr(S._LlamaLike, "supports", classmethod(lambda cls, m: False))
    slow = sample(tiny_model, prompts, params, torch.Generator().manual_seed(5))
    assert [o.ids for o in fast] == [o.ids for o in slow]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(
            torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0
        )


def test_top_p_and_top_k_filters_by_hand():
    # probs of logits log([.5, .3, .15, .05]) -> top_p .7 keeps .5 and .3 (mass before .15 is .8)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, top_p=0.7, top_k=0))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, top_p=1.0, top_k=3))
    assert kept.tolist() == [[True, True, True, False]]
    # the most likely token always survives, even for a tiny top_p
    assert torch.isfinite(_filter_logits(logits, top_p=1e-6, top_k=0)).tolist() == [
        [True, False, False, False]
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_seeded_sampling_is_reproducible(tiny_model, temperature):
    prompts = _prompts(3, tiny_model.config.vocab_size, seed=4)
    params = SamplingParams(temperature=temperature, max_new_tokens=6)
    a = sample(tiny_model, prompts, params, torch.Generator().manual_seed(1))
    b = sample(tiny_model, prompts, params, torch.Generator().manual_seed(1))
    assert [o.ids for o in a] == [o.ids for o in b]


def test_grouped_prompts_are_prefilled_once_with_the_same_result(tiny_model):
    prompts = _prompts(3, tiny_model.config.vocab_size, seed=6)
    grouped = [p for p in prompts for _ in range(4)]  # a GRPO batch: 3 groups of 4
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    outs = sample(tiny_model, grouped, params)
    alone = sample(tiny_model, prompts, params)
    for i, o in enumerate(outs):
        assert o.ids == alone[i // 4].ids
        torch.testing.assert_close(
            torch.tensor(o.logprobs), torch.tensor(alone[i // 4].logprobs), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("compile", [False, True])
def test_sample_and_sample_stream_decode_without_autograd(tiny_model, compile):
    """Decoding a trainable model records no graph: under autograd every step's activations
    would stay alive (memory grows, and decoding slowed 1.5-4x when ``sample`` lost it)."""
    tiny_model.train()
    assert any(p.requires_grad for p in tiny_model.parameters())
    seen = []
    hook = tiny_model.model.embed_tokens.register_forward_hook(
        lambda *_: seen.append(torch.is_grad_enabled())
    )
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=4)
        gen = torch.Generator().manual_seed(0)
        sample(tiny_model, _prompts(3, tiny_model.config.vocab_size), params, gen, compile=compile)
        for _ in S.sample_stream(tiny_model, _prompts(2, 64), params, gen, compile=compile):
            pass
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert tiny_model.training  # restored
