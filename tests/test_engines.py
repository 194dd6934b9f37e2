"""Rollout engines against independent references: HF forward, HF generate, the softmax itself.

Models are tiny Llama and Qwen2 decoders (grouped-query attention, float32) built from a config
with a fixed seed. ``initializer_range=0.3`` spreads the logits, so greedy outputs wander
instead of looping and first-token distributions are far from uniform: both make the
comparisons below able to fail.
"""

from __future__ import annotations

import copy
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from ahamoment.rollout import (
    ENGINES,
    Engine,
    HFEngine,
    Request,
    SamplingParams,
    TorchEngine,
    make_engine,
    sample,
    sample_stream,
    vllm_sampling_kwargs,
)
from ahamoment.rollout import sampler as S
from ahamoment.rollout.base import StopStrings
from ahamoment.rollout.vllm_engine import completion_from_vllm
from tests_support import GQA_VOCAB, gqa_llama, gqa_qwen2

V = GQA_VOCAB
ALPHA = 1e-3  # chi-square significance: a correct sampler fails a test with probability 1e-3
_llama, _qwen2 = gqa_llama, gqa_qwen2  # Llama and Qwen2 with grouped-query attention


@pytest.fixture(scope="module")
def models():
    return {"llama": _llama(), "qwen2": _qwen2()}


def _prompts(n, seed=0, lo=4, hi=13):
    rng = random.Random(seed)
    return [[rng.randrange(1, V) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _hf_greedy(model, prompt, n, stop_ids=()):
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=list(stop_ids),  # [] ignores the config's EOS
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def _teacher_forced(model, prompt, ids):
    """Raw next-token logits at each completion position, (T, V), from one HF forward."""
    with torch.no_grad():
        return model(torch.tensor([list(prompt) + list(ids)])).logits[0, len(prompt) - 1 : -1]


# --- prefill and greedy against transformers -------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_logits_match_hf_forward(models, arch):
    model = models[arch]
    prompts = [[5, 9, 13, 2, 40], list(range(1, 10)), _prompts(1, seed=3, lo=13, hi=13)[0]]
    T = max(len(p) for p in prompts)
    ids = torch.zeros((3, T), dtype=torch.long)
    valid = torch.zeros((3, T), dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding, as the sampler prefills
        ids[i, T - len(p) :], valid[i, T - len(p) :] = torch.tensor(p), True
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = S._LlamaLike(model).forward(ids, pos, valid, last_only=False)  # (3, T, V)
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p])).logits[0]  # (len(p), V), unpadded
            # float32, same formulas, other kernels (attention, RMS norm, SiLU) summing in
            # their own order: differences are ~1e-6 of the largest logit
            tol = 4e-6 * ref.abs().max().item()
            torch.testing.assert_close(ours[i, T - len(p) :], ref, atol=tol, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_is_token_identical_to_hf_generate_over_64_tokens(models, arch):
    model = models[arch]
    prompts = _prompts(4, seed=1)  # mixed lengths: one left-padded batch
    outs = sample(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=64))
    for p, o in zip(prompts, outs):
        ref = _hf_greedy(model, p, 64)
        assert len(ref) == 64 and len(set(ref)) > 8  # no EOS, and not a short loop
        assert o.ids == ref and o.finish_reason == "length"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_a_stop_id_matches_hf_generate(models, arch):
    model = models[arch]
    prompts = _prompts(4, seed=2)
    stop = _hf_greedy(model, prompts[0], 64)[20]  # a token row 0 emits, HF's eos here
    params = SamplingParams(temperature=0.0, max_new_tokens=64, stop_ids=(stop,))
    for p, o in zip(prompts, sample(model, prompts, params)):
        ref = _hf_greedy(model, p, 64, stop_ids=(stop,))
        assert o.ids == ref
        assert o.finish_reason == ("stop" if ref[-1] == stop else "length")
    assert sample(model, prompts[:1], params)[0].ids[-1] == stop


# --- sampled token frequencies against the softmax -----------------------------------


def _reference_probs(logits, temperature, top_p=1.0, top_k=0):
    """softmax(logits / T) cut to the top k, renormalised, then cut to the smallest nucleus of
    mass >= top_p, renormalised (HF's and vLLM's order: top-p sees the top-k distribution).

    Written independently of the sampler's masking code: walk the tokens in order of mass.
    """
    probs = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(probs, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    total = float(probs[order].sum())
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for i in order:
        if mass >= top_p:
            break
        keep[i], mass = True, mass + float(probs[i]) / total
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


def _chi2_pvalue(counts, probs):
    """Pearson goodness of fit; bins expecting < 5 are pooled. Zero-probability bins must be empty."""
    assert int(counts[probs == 0].sum()) == 0, "sampled a token the filter removed"
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big & (probs > 0)].sum().double()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def _first_token_counts(model, prompt, params, n, seed):
    engine = TorchEngine(model)
    outs = engine.generate([Request(prompt, params, n)], torch.Generator().manual_seed(seed))[0]
    assert len(outs) == n and all(len(o.ids) == 1 for o in outs)
    return torch.bincount(torch.tensor([o.ids[0] for o in outs]), minlength=V)


@pytest.mark.parametrize(
    "arch,temperature,top_p,top_k",
    [
        ("llama", 1.0, 1.0, 0),
        ("llama", 0.7, 1.0, 0),
        ("llama", 1.0, 1.0, 5),
        ("llama", 1.0, 0.8, 0),
        ("qwen2", 0.7, 0.9, 20),
    ],
)
def test_sampled_first_tokens_follow_the_softmax(models, arch, temperature, top_p, top_k):
    # 20k draws of one prompt's first token, seed 0. The test accepts at p > 1e-3 and also
    # requires that the same counts reject the distribution of a wrong setting (power).
    model, prompt = models[arch], [7, 3, 22, 41, 9]
    logits = _teacher_forced(model, prompt, [0])[0]
    params = SamplingParams(temperature, top_p, top_k, max_new_tokens=1)
    counts = _first_token_counts(model, prompt, params, 20_000, seed=0)
    right = _reference_probs(logits, temperature, top_p, top_k)
    assert _chi2_pvalue(counts, right) > ALPHA
    # power: the same counts reject a wrong setting (other temperature; or no truncation)
    if top_p < 1.0 or top_k:
        wrong = _reference_probs(logits, temperature)
    else:
        wrong = _reference_probs(logits, 0.7 if temperature == 1.0 else 1.0)
    assert _chi2_pvalue(counts, wrong) < ALPHA


# --- per-request settings in one batch ------------------------------------------------


def test_requests_with_different_temperatures_in_one_batch_follow_their_own_softmax(models):
    model, prompt = models["llama"], [7, 3, 22, 41, 9]
    logits = _teacher_forced(model, prompt, [0])[0]
    requests = [
        Request(prompt, SamplingParams(1.0, max_new_tokens=1), n=10_000),
        Request(prompt, SamplingParams(0.5, max_new_tokens=1), n=10_000),
        Request(prompt, SamplingParams(0.0, max_new_tokens=1), n=3),
    ]
    hot, cold, greedy = TorchEngine(model).generate(requests, torch.Generator().manual_seed(1))
    hot_c = torch.bincount(torch.tensor([o.ids[0] for o in hot]), minlength=V)
    cold_c = torch.bincount(torch.tensor([o.ids[0] for o in cold]), minlength=V)
    p1, p05 = _reference_probs(logits, 1.0), _reference_probs(logits, 0.5)
    assert _chi2_pvalue(hot_c, p1) > ALPHA and _chi2_pvalue(cold_c, p05) > ALPHA
    # each row used its own temperature: the other row's softmax is rejected
    assert _chi2_pvalue(hot_c, p05) < ALPHA and _chi2_pvalue(cold_c, p1) < ALPHA
    assert [o.ids for o in greedy] == [[int(logits.argmax())]] * 3


def test_mixed_requests_in_one_batch_equal_each_request_alone(models):
    model = models["qwen2"]
    a, b, c, d = _prompts(4, seed=5)
    stop = _hf_greedy(model, c, 40)[15]
    requests = [
        Request(a, SamplingParams(0.0, max_new_tokens=30)),
        Request(b, SamplingParams(0.7, 1.0, 5, max_new_tokens=20), n=3),
        Request(c, SamplingParams(0.0, max_new_tokens=40, stop_ids=(stop,))),
        Request(d, SamplingParams(1.3, 0.8, 0, max_new_tokens=5), n=2),
        Request(a, SamplingParams(0.0, max_new_tokens=0)),
    ]
    engine = TorchEngine(model)
    outs = engine.generate(requests, torch.Generator().manual_seed(3))
    assert [len(o) for o in outs] == [1, 3, 1, 2, 1]
    # greedy rows: exactly what each request gives alone (and HF generate)
    for i in (0, 2):
        alone = engine.generate([requests[i]])[0][0]
        assert outs[i][0].ids == alone.ids == _hf_greedy(model, requests[i].prompt, len(alone.ids))
        torch.testing.assert_close(
            torch.tensor(outs[i][0].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
        )
    assert len(outs[0][0].ids) == 30 and outs[0][0].finish_reason == "length"
    assert outs[2][0].ids[-1] == stop and outs[2][0].finish_reason == "stop"
    assert outs[4][0].ids == [] and outs[4][0].finish_reason == "length"
    # sampled rows: own length cap, own temperature in the log-probs, own top-k / top-p
    for r, out in ((requests[1], outs[1]), (requests[3], outs[3])):
        p = r.params
        for o in out:
            assert len(o.ids) == p.max_new_tokens and o.finish_reason == "length"
            logits = _teacher_forced(model, r.prompt, o.ids)
            ref = torch.log_softmax(logits / p.temperature, -1)
            ref = ref.gather(-1, torch.tensor(o.ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-5, rtol=1e-5)
            for t, row in zip(o.ids, logits):
                assert _reference_probs(row, p.temperature, p.top_p, p.top_k)[t] > 0


def test_filter_logits_per_row_by_hand():
    # probs [.5, .3, .15, .05]: top-k 2 keeps two; top-p .7 keeps .5 and .3 (mass before .15 is
    # .8 >= .7); a row with neither filter keeps all four
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3, 1)
    kept = torch.isfinite(
        S._filter_logits(logits, torch.tensor([1.0, 0.7, 1.0]), torch.tensor([2, 0, 0]))
    )
    assert kept.tolist() == [[True, True, False, False]] * 2 + [[True] * 4]
    # softmax([0, -30, -30]) = [1 - 1.9e-13, 9.4e-14, 9.4e-14]: in float32 the mass before the
    # last token rounds to 1.0, so top_p = 1 must switch the filter off, not compare 1.0 >= 1.0
    tail = torch.tensor([[0.0, -30.0, -30.0]]).repeat(2, 1)
    kept = torch.isfinite(S._filter_logits(tail, torch.tensor([1.0, 0.5]), torch.tensor([0, 0])))
    assert kept.tolist() == [[True, True, True], [True, False, False]]


# --- streaming ----------------------------------------------------------------------------


def test_streaming_equals_the_batch_result_and_is_incremental(models):
    model = models["llama"]
    request = Request(
        [4, 8, 15, 16, 23], SamplingParams(0.9, max_new_tokens=30, stop_ids=(3, 4)), n=3
    )
    engine = TorchEngine(model)
    batch = engine.generate([request], torch.Generator().manual_seed(7))[0]
    ids, lps, reasons = [[], [], []], [[], [], []], [[], [], []]
    for ev in engine.stream(request, torch.Generator().manual_seed(7)):
        assert not reasons[ev.index], "a token after the finishing one"
        ids[ev.index].append(ev.token_id)
        lps[ev.index].append(ev.logprob)
        if ev.finish_reason:
            reasons[ev.index].append(ev.finish_reason)
    assert ids == [o.ids for o in batch] and lps == [o.logprobs for o in batch]
    assert reasons == [[o.finish_reason] for o in batch]

    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    try:
        steps = sample_stream(model, [request.prompt], SamplingParams(0.0, max_new_tokens=30))
        first = next(steps)
        assert len(first) == 1 and len(calls) == 1  # one token out after the prefill alone
        assert len(list(steps)) == 29 and len(calls) == 30
    finally:
        hook.remove()


# --- stop strings ---------------------------------------------------------------------------


def test_stop_string_ends_at_the_completing_token_and_is_kept(tiny_model, tiny_tokenizer):
    prompt = tiny_tokenizer("Using the numbers [3, 5, 7]", add_special_tokens=False)["input_ids"]
    free = sample(tiny_model, [prompt], SamplingParams(0.0, max_new_tokens=24))[0]
    text = tiny_tokenizer.decode(free.ids, skip_special_tokens=False)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and stop in text
    # independent expectation: the shortest prefix whose *full* decode contains the string
    cut = next(
        k
        for k in range(1, len(free.ids) + 1)
        if stop in tiny_tokenizer.decode(free.ids[:k], skip_special_tokens=False)
    )
    params = SamplingParams(0.0, max_new_tokens=24, stop=(stop,))
    for engine in (TorchEngine(tiny_model, tiny_tokenizer), HFEngine(tiny_model, tiny_tokenizer)):
        o = engine.generate([Request(prompt, params)])[0][0]
        assert o.ids == free.ids[:cut] and o.finish_reason == "stop"
        assert stop in tiny_tokenizer.decode(o.ids, skip_special_tokens=False)
    with pytest.raises(ValueError, match="need a tokenizer"):
        TorchEngine(tiny_model).generate([Request(prompt, params)])


def test_stop_strings_decode_in_rust_exactly_as_the_tokenizer_does(tiny_tokenizer):
    """The fast path (one call into the Rust tokenizer) is taken for our tokenizer and decodes
    every window as ``tokenizer.decode`` does; a tokenizer that cleans up spaces keeps the slow
    one (``tokenizer.decode`` itself)."""
    stops = StopStrings(tiny_tokenizer, ("</answer>",))
    assert stops.decode != stops._decode  # the Rust call
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(
            0, len(tiny_tokenizer), (int(torch.randint(1, 40, (1,), generator=g)),), generator=g
        ).tolist()
        assert stops.decode(ids) == tiny_tokenizer.decode(ids, skip_special_tokens=False)
    cleaned = copy.deepcopy(tiny_tokenizer)
    cleaned.clean_up_tokenization_spaces = True
    slow = StopStrings(cleaned, ("x",))
    assert slow.decode == slow._decode


# --- the HF reference engine and the interface ------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_engine_greedy_ids_and_logprobs_agree_with_ours(models, arch):
    model = models[arch]
    requests = [Request(p, SamplingParams(0.0, max_new_tokens=64)) for p in _prompts(3, seed=7)]
    ours = TorchEngine(model).generate(requests)
    ref = HFEngine(model).generate(requests)
    for a, b in zip(ours, ref):
        assert a[0].ids == b[0].ids and a[0].finish_reason == b[0].finish_reason == "length"
        torch.testing.assert_close(
            torch.tensor(a[0].logprobs), torch.tensor(b[0].logprobs), atol=1e-5, rtol=0
        )


def test_hf_engine_sampled_logprobs_are_after_temperature_before_truncation(models):
    model = models["llama"]
    request = Request(
        [9, 8, 7, 6], SamplingParams(0.6, 0.9, 10, max_new_tokens=12, stop_ids=(5,)), n=3
    )
    outs = HFEngine(model).generate([request], torch.Generator().manual_seed(0))[0]
    assert len(outs) == 3
    for o in outs:
        assert o.finish_reason == ("stop" if o.ids[-1] == 5 else "length")
        assert 5 not in o.ids[:-1] and (o.finish_reason == "stop" or len(o.ids) == 12)
        logits = _teacher_forced(model, request.prompt, o.ids)
        ref = torch.log_softmax(logits / 0.6, -1).gather(-1, torch.tensor(o.ids)[:, None])
        torch.testing.assert_close(torch.tensor(o.logprobs), ref.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_engine_registry_and_weight_sync(models):
    assert ENGINES.names() == ["hf", "openai", "server", "torch", "torch-eager", "vllm"]
    model = models["llama"]
    engine = make_engine("torch", model)
    assert isinstance(engine, Engine) and isinstance(make_engine("hf", model), Engine)
    engine.sync_weights(model)  # same module: nothing to copy
    assert engine.model is model
    private = _llama()
    engine = make_engine("torch", private)
    trained = _llama()
    with torch.no_grad():
        trained.lm_head.weight.mul_(-1.0)  # reverses every preference: a different greedy path
    request = Request([1, 2, 3], SamplingParams(0.0, max_new_tokens=8))
    before = engine.generate([request])[0][0].ids
    engine.sync_weights(trained)
    after = engine.generate([request])[0][0].ids
    assert after == _hf_greedy(trained, [1, 2, 3], 8) != before


def test_sampling_params_validation_and_positional_api():
    p = SamplingParams(0.5, 0.9, 3, 10, [7, 8])  # positional order of the original API
    assert p.stop_ids == (7, 8) and p.stop == () and not p.greedy
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(top_k=-1), dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --- vLLM: what can be checked without a GPU --------------------------------------------


def test_vllm_engine_without_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'ahamoment\[vllm\]'"):
        make_engine("vllm", "/no/such/model")


def test_vllm_sampling_kwargs_by_hand():
    p = SamplingParams(0.7, 0.9, 5, 64, (2, 3), ("</answer>",))
    assert vllm_sampling_kwargs(p, n=8, seed=11) == {
        "n": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 64,
        "stop": ["</answer>"],
        "stop_token_ids": [2, 3],
        "include_stop_str_in_output": True,
        "ignore_eos": True,
        "logprobs": 0,
        "skip_special_tokens": False,
        "seed": 11,
    }
    greedy = vllm_sampling_kwargs(SamplingParams(0.0, 0.5, 7, 16), n=4)
    assert (greedy["n"], greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (
        1,
        0.0,
        1.0,
        0,
    )
    assert greedy["stop"] is None and greedy["stop_token_ids"] is None and greedy["seed"] is None
    with pytest.raises(ValueError):
        vllm_sampling_kwargs(SamplingParams(max_new_tokens=0))


def test_completion_from_vllm_reads_the_sampled_tokens_logprob():
    lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731
    out = SimpleNamespace(
        index=0,
        token_ids=[5, 9],
        logprobs=[{5: lp(-0.1)}, {1: lp(-0.3), 9: lp(-2.0)}],  # a top-1 entry beside the sample
        finish_reason="stop",
    )
    c = completion_from_vllm(out)
    assert (c.ids, c.logprobs, c.finish_reason) == ([5, 9], [-0.1, -2.0], "stop")
    with pytest.raises(RuntimeError, match="abort"):
        completion_from_vllm(SimpleNamespace(**{**vars(out), "finish_reason": "abort"}))


# --- shared-prompt cache and inverse-CDF draws ------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_interleaved_groups_with_ragged_retirement_equal_each_row_alone(models, arch):
    # Rows of three prompts interleaved (A B A C B A ...), each with its own length cap, so
    # retirement leaves groups of unequal size and the grouped prompt attention takes its
    # scattered (non-dense) layout; grouped-query attention (4 heads, 2 kv heads) as well.
    model = models[arch]
    a, b, c = _prompts(3, seed=11)
    prompts = [a, b, a, c, b, a, c, a, b, a]
    caps = [3, 17, 9, 1, 30, 24, 6, 12, 2, 30]
    params = [SamplingParams(0.0, max_new_tokens=n) for n in caps]
    outs = sample(model, prompts, params)
    for p, n, o in zip(prompts, caps, outs):
        alone = sample(model, [p], SamplingParams(0.0, max_new_tokens=n))[0]
        assert o.ids == alone.ids == _hf_greedy(model, p, n)
        torch.testing.assert_close(
            torch.tensor(o.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
        )


def test_cache_memory_is_read_only_once_written_or_zeroed(models, monkeypatch):
    # The completion cache is allocated with torch.empty and a block is zeroed only when
    # decoding enters it. Fill every torch.empty with NaN: a read of memory that was neither
    # written nor zeroed would turn outputs into NaN or change tokens. Caps cross several
    # blocks (BLOCK 32), with compactions inside a block and on a block boundary.
    model = models["llama"]
    a, b = _prompts(2, seed=12)
    prompts = [a, b, a, b, a, b, a, b]
    caps = [70, 5, 33, 64, 32, 1, 90, 40]
    params = [SamplingParams(0.0, max_new_tokens=n) for n in caps]
    ref = sample(model, prompts, params)
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        t = real_empty(*size, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    outs = sample(model, prompts, params)
    for o, r in zip(outs, ref):
        assert o.ids == r.ids
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(r.logprobs))


def test_shared_prompt_cache_is_kept_once_per_prompt(models):
    model = models["llama"]
    prompts = _prompts(3, seed=2)
    runner = S._LlamaLike(model)
    ids = torch.zeros((3, max(len(p) for p in prompts)), dtype=torch.long)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p) :], valid[i, ids.shape[1] - len(p) :] = torch.tensor(p), True
    with torch.no_grad():
        runner.prefill(ids, (valid.long().cumsum(-1) - 1).clamp(min=0), valid)
    slot = runner.start(torch.tensor([2, 0, 0, 1, 2, 1, 1, 0, 2]), 4)  # 3 groups of 3
    assert runner.kp.shape[1] == 3 and (runner.U, runner.G) == (3, 3)
    assert sorted(slot.tolist()) == list(range(9)) and (slot // 3).tolist() == [
        2,
        0,
        0,
        1,
        2,
        1,
        1,
        0,
        2,
    ]
    assert runner.retire(slot[:8]) is None  # 8 of 9 slots: not worth a compaction
    # prompt 1 has no rows left and is dropped; groups of 2 and 3 fit a 2 x 3 grid
    new = runner.retire(slot[[0, 1, 2, 4, 7]])
    assert runner.kp.shape[1] == 2 and (runner.U, runner.G) == (2, 3)
    assert (new // 3).tolist() == [1, 0, 0, 1, 0]
    # too ragged for a grid (3 + 1 rows in 2 x 3 slots): one prompt copy per row
    new = runner.retire(new[[1, 2, 3]])
    assert runner.kp.shape[1] == 3 and (runner.U, runner.G) == (3, 1) and new.tolist() == [0, 1, 2]


def _uniform_at(u):
    """A stand-in for ``torch.rand`` that returns ``u`` everywhere."""
    return lambda shape, **kw: torch.full(shape, u, dtype=kw.get("dtype"), device=kw.get("device"))


def test_inverse_cdf_draw_never_picks_a_masked_token(monkeypatch):
    # masked tokens first, in the middle and last; uniforms at 0, just below 1 and exactly 1
    inf = float("-inf")
    logits = torch.tensor([[inf, 0.3, inf, 1.2, -0.4, inf]])
    for u, want in ((0.0, 1), (0.5, 3), (1.0 - 2**-24, 4), (1.0, 4)):
        monkeypatch.setattr(torch, "rand", _uniform_at(u))
        assert S._draw(logits, None).tolist() == [want], u
    # round-off: a total a little under 1 still never reaches the masked last bin
    monkeypatch.setattr(torch, "rand", _uniform_at(1.0 - 2**-24))
    many = torch.randn(256, 1000) * 10
    many[:, -3:] = inf
    assert int(S._draw(many, None).max()) < 997
