"""The fused decoding step (``rollout/compiled.py``) against the eager sampler.

Both sides decode the same batch from the same uniforms, so the tokens must be equal and the
log-probs equal up to float rounding. Tolerance: the fused kernels sum in other orders than
torch (RMS norm, attention, softmax), each sum off by a few fp32 ulps (1.2e-7 relative); on
these tiny models the logits are O(1-10) and pass through 2 layers, so log-probs drift by
about 1e-6 (measured: at most 9.5e-7 over these tests, 1.6e-5 on the 0.9M embedded model
over 128 x 128 tokens). ``ATOL`` = 1e-5 leaves 10x margin here and still catches any real
error (a wrong mask or a missing key moves log-probs by > 1e-2).
"""

import copy
import random
import sys
import warnings

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ahamoment.models import new_model
from ahamoment.rollout import TorchEngine, compiled
from ahamoment.rollout.base import Request
from ahamoment.rollout.budget import ThinkingBudget
from ahamoment.rollout.sampler import SamplingParams, sample

ATOL = 1e-5


def _prompts(n, vocab, seed=0, lo=5, hi=14):
    rng = random.Random(seed)
    return [[rng.randrange(7, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _assert_same(eager, fused):
    assert [c.ids for c in fused] == [c.ids for c in eager]
    assert [c.finish_reason for c in fused] == [c.finish_reason for c in eager]
    for a, b in zip(eager, fused):
        torch.testing.assert_close(
            torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=ATOL, rtol=0
        )


def _both(model, prompts, params, seed=0, **kw):
    eager = sample(model, prompts, params, torch.Generator().manual_seed(seed), **kw)
    fused = sample(model, prompts, params, torch.Generator().manual_seed(seed), compile=True, **kw)
    return eager, fused


@pytest.fixture(scope="module")
def qwen2_model(tiny_tokenizer):
    """Qwen2: biases on q/k/v."""
    cfg = Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initializes biases to 0; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def test_greedy_tokens_equal_eager(tiny_model):
    prompts = _prompts(6, tiny_model.config.vocab_size)  # mixed lengths: left padding
    eager, fused = _both(tiny_model, prompts, SamplingParams(temperature=0.0, max_new_tokens=20))
    _assert_same(eager, fused)


def test_lm_head_bias_counts_at_every_step(tiny_model):
    """A biased LM head (untied, random bias): the fused step adds the bias as eager does."""
    model = copy.deepcopy(tiny_model)
    V, C = model.lm_head.weight.shape
    head = torch.nn.Linear(C, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(torch.randn(V, generator=torch.Generator().manual_seed(4)) * 3)
    model.lm_head = head
    prompts = _prompts(6, V)
    eager, fused = _both(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=20))
    _assert_same(eager, fused)
    plain = _both(tiny_model, prompts, SamplingParams(temperature=0.0, max_new_tokens=20))[0]
    assert [o.ids for o in plain] != [o.ids for o in eager]  # the bias changes the tokens


@pytest.mark.parametrize("model_name", ["tiny_model", "gqa_model", "qwen2_model"])
def test_sampled_groups_equal_eager(model_name, request):
    model = request.getfixturevalue(model_name)
    prompts = [p for p in _prompts(4, model.config.vocab_size, seed=1) for _ in range(3)]
    params = SamplingParams(temperature=0.8, max_new_tokens=24)
    eager, fused = _both(model, prompts, params, seed=3)
    _assert_same(eager, fused)


def test_retiring_rows_compact_the_cache_and_match_eager(tiny_model, monkeypatch):
    # rows end at their own lengths (2 .. 17 tokens) or at a stop id, so the cache is compacted
    # several times as they retire; a prompt beyond 8 tokens spans two key tiles
    prompts = [p for p in _prompts(4, tiny_model.config.vocab_size, seed=2, hi=20) for _ in (0, 1)]
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=2 + 2 * i, stop_ids=(9,))
        for i in range(len(prompts))
    ]
    sizes = []
    retire = compiled.FusedLlama.retire

    def spy(self, slot):
        new = retire(self, slot)
        if new is not None:
            sizes.append(self.size)
        return new

    monkeypatch.setattr(compiled.FusedLlama, "retire", spy)
    eager, fused = _both(tiny_model, prompts, params, seed=4)
    _assert_same(eager, fused)
    assert len(sizes) >= 2 and sizes == sorted(sizes, reverse=True), sizes
    assert len({len(c.ids) for c in fused}) > 2  # rows did end at different lengths


def test_top_p_top_k_and_greedy_rows_mixed(tiny_model):
    # these rows take the eager choice on the fused step's logits
    prompts = _prompts(6, tiny_model.config.vocab_size, seed=5)
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=10),
        SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=10),
        SamplingParams(temperature=0.7, top_k=5, max_new_tokens=10),
        SamplingParams(temperature=1.3, max_new_tokens=10),
    ] * 2
    eager, fused = _both(tiny_model, prompts + prompts[:2], params, seed=6)
    _assert_same(eager, fused)


def test_engine_option(tiny_model):
    requests = [
        Request(tuple(p), SamplingParams(temperature=1.0, max_new_tokens=8), n=3)
        for p in _prompts(3, tiny_model.config.vocab_size, seed=7)
    ]
    eager = TorchEngine(tiny_model).generate(requests, torch.Generator().manual_seed(8))
    fused = TorchEngine(tiny_model, compile=True).generate(
        requests, torch.Generator().manual_seed(8)
    )
    for a, b in zip(eager, fused):
        _assert_same(a, b)
    # with half caches they agree the same way
    gen = [torch.Generator().manual_seed(8) for _ in range(2)]
    eager = TorchEngine(tiny_model, kv_cache="float16").generate(requests, gen[0])
    fused = TorchEngine(tiny_model, compile=True, kv_cache="float16").generate(requests, gen[1])
    for a, b in zip(eager, fused):
        _assert_same(a, b)


def test_no_compiler_falls_back_to_eager_with_one_warning(tiny_model, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(compiled, "_libs", {})
    monkeypatch.setattr(compiled, "_lib_error", None)
    monkeypatch.setattr(compiled, "_warned", set())
    prompts = _prompts(3, tiny_model.config.vocab_size, seed=9)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    eager = sample(tiny_model, prompts, params, torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [
            sample(tiny_model, prompts, params, torch.Generator().manual_seed(1), compile=True)
            for _ in range(2)
        ]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "decoding eagerly" in messages[0], messages
    for out in outs:  # the eager path itself: bit for bit
        assert [(c.ids, c.logprobs) for c in out] == [(c.ids, c.logprobs) for c in eager]


def test_a_failing_unit_fails_the_build_with_the_compilers_message(tmp_path, monkeypatch):
    # the units compile side by side; one that fails fails the build (every flag set), its
    # stderr in the error, and nothing lands in the cache
    cc = tmp_path / "cc"
    cc.write_text(
        '#!/bin/sh\ncase "$*" in *unit1.c*) echo "unit1: boom" >&2; exit 1;; esac\nexec gcc "$@"\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("AHAMOMENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compiled, "_libs", {})
    monkeypatch.setattr(compiled, "_lib_error", None)
    with pytest.raises(RuntimeError, match="unit1: boom") as e:
        compiled.kernels(32)
    assert str(e.value).count("unit1: boom") == len(compiled._FLAG_SETS)
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_unsupported_model_decodes_eagerly(tiny_model, monkeypatch):
    monkeypatch.setattr(compiled, "_warned", set())
    model = new_model(tiny_model.config, seed=0).double().eval()  # fp64: not fused
    prompts = _prompts(2, model.config.vocab_size, seed=10)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    with pytest.warns(RuntimeWarning, match="fp32 on CPU only"):
        fused = sample(model, prompts, params, compile=True)
    assert [c.ids for c in fused] == [c.ids for c in sample(model, prompts, params)]


def test_tiles_layout_by_hand():
    # keys (T=10, D=2): column j holds (j, -j); tile b, lane l is column 8b + l, transposed
    keys = torch.stack([torch.arange(10.0), -torch.arange(10.0)], dim=-1)
    tiles = compiled._tiles(keys, 8)
    assert tiles.shape == (2, 2, 8)
    assert tiles[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert tiles[1, 1].tolist() == [-8, -9, 0, 0, 0, 0, 0, 0]  # missing columns are zero


def test_kernels_of_another_head_size_are_refused(gqa_model, monkeypatch):
    # the decoding kernels are built for one head size (32 here); a build for another is
    # refused with one warning line, and the rows decode eagerly
    build = compiled.kernels
    monkeypatch.setattr(compiled, "_warned", set())
    monkeypatch.setattr(compiled, "kernels", lambda head_dim, **kw: build(head_dim + 8, **kw))
    prompts = _prompts(4, gqa_model.config.vocab_size, seed=11)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    with pytest.warns(RuntimeWarning, match="kernels built for heads of 40, not 32"):
        eager, fused = _both(gqa_model, prompts, params)
    assert [(c.ids, c.logprobs) for c in fused] == [(c.ids, c.logprobs) for c in eager]


def test_half_cache_matches_eager_half_cache(gqa_model):
    # kv_cache="float16": the fused kernels and the eager step (an independent torch
    # implementation) round the same keys and values once and agree to float rounding
    prompts = [p for p in _prompts(6, gqa_model.config.vocab_size, seed=12) for _ in range(3)]
    params = SamplingParams(temperature=1.0, max_new_tokens=40)
    eager, fused = _both(gqa_model, prompts, params, kv_cache="float16")
    _assert_same(eager, fused)


def test_half_cache_moves_log_probs_by_its_rounding(gqa_model):
    # the same tokens scored with an fp32 cache and a half one: close (half rounds each key
    # and value by at most 2^-11 of it), but not identical (the cache really is half)
    prompts = _prompts(6, gqa_model.config.vocab_size, seed=13)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=30)
    full = sample(gqa_model, prompts, greedy, compile=True)
    half = sample(gqa_model, prompts, greedy, compile=True, kv_cache="float16")
    assert [c.ids for c in half] == [c.ids for c in full]
    a = torch.tensor([lp for c in full for lp in c.logprobs])
    b = torch.tensor([lp for c in half for lp in c.logprobs])
    assert 0 < (a - b).abs().max() < 1e-2


def test_half_cache_is_half(gqa_model):
    assert compiled.fused_runner(gqa_model, 64).kv_dtype == torch.float32  # model: the default
    assert compiled.fused_runner(gqa_model, 64, "float16").kv_dtype == torch.float16
    with pytest.raises(ValueError, match="kv_cache: 'bf16' is not one of model, float16"):
        compiled.fused_runner(gqa_model, 64, "bf16")


def test_half_widening_without_f16c_is_exact():
    # the kernels' integer widening of halves (used where the CPU lacks F16C), here in torch:
    # bits << 13 read as a float, times 2^112, sign back; every finite half, subnormals included
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    halves = bits.to(torch.int16).view(torch.float16)
    finite = torch.isfinite(halves)
    mag = ((bits & 0x7FFF) << 13).view(torch.float32) * 2.0**112
    widened = (mag.view(torch.int32) | ((bits & 0x8000) << 16)).view(torch.float32)
    assert torch.equal(widened[finite], halves[finite].float())


def test_half_cache_portable_build_matches_eager(gqa_model, monkeypatch):
    # the portable build (no -march=native, so no F16C on x86) widens halves with the integer
    # ops above; it agrees with the eager half cache as the native build does
    monkeypatch.setattr(compiled, "_FLAG_SETS", (compiled._FLAG_SETS[-1],))
    monkeypatch.setattr(compiled, "_libs", {})
    prompts = [p for p in _prompts(4, gqa_model.config.vocab_size, seed=14) for _ in range(2)]
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    eager, fused = _both(gqa_model, prompts, params, kv_cache="float16")
    _assert_same(eager, fused)
    assert ("decode", 32, True) in compiled._libs  # built here, the portable way


def test_budget_forcing_rows_match_eager(tiny_model):
    # budget rows take the eager choice (and forcing) on the fused step's logits
    budget = ThinkingBudget(end_id=9, force_ids=(9,), wait_ids=(10, 11), max_think=6, min_think=3)
    prompts = _prompts(4, tiny_model.config.vocab_size, seed=12)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, budget=budget)
    eager, fused = _both(tiny_model, prompts, params, seed=13)
    _assert_same(eager, fused)


def test_rows_split_over_threads_equal_one_thread(gqa_model, monkeypatch):
    # attention's slots split over torch's threads (OpenMP): each slot's arithmetic is the same
    # whatever the split, so tokens and log-probs are bit for bit those of one thread; 23 rows
    # (an odd split) ending at their own lengths, so the cache is compacted on the way
    lib = compiled.kernels(gqa_model.model.layers[0].self_attn.head_dim)
    prompts = _prompts(23, gqa_model.config.vocab_size, seed=14, hi=20)
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=4 + i, stop_ids=(9,))
        for i in range(len(prompts))
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if sys.platform.startswith("linux"):  # gcc links the libgomp torch already loaded
            assert compiled.threads(lib) == 2
        split = sample(gqa_model, prompts, params, torch.Generator().manual_seed(5), compile=True)
        monkeypatch.setattr(compiled, "threads", lambda lib: 1)
        one = sample(gqa_model, prompts, params, torch.Generator().manual_seed(5), compile=True)
    finally:
        torch.set_num_threads(before)
    assert [(c.ids, c.logprobs) for c in split] == [(c.ids, c.logprobs) for c in one]
    assert len({len(c.ids) for c in one}) > 2


def test_a_reused_cache_buffer_gives_the_rows_of_a_fresh_one(gqa_model, monkeypatch):
    # a finished decode's cache buffers go back to SPARE; the next decode takes them with their
    # old contents, here NaN everywhere: the kernel reads only what it wrote, so the rows are
    # bit for bit those decoded into fresh buffers
    spare = compiled.SpareCaches()
    monkeypatch.setattr(compiled, "SPARE", spare)
    prompts = [p for p in _prompts(5, gqa_model.config.vocab_size, seed=21) for _ in range(3)]
    params = SamplingParams(temperature=1.0, max_new_tokens=20, stop_ids=(9,))

    def run():
        out = sample(gqa_model, prompts, params, torch.Generator().manual_seed(4), compile=True)
        return [(c.ids, c.logprobs, c.finish_reason) for c in out]

    fresh = run()
    kept = list(spare._free)
    assert len(kept) == 2  # the keys' and the values' buffers, back once the decode ended
    for b in kept:
        b.fill_(float("nan"))
    assert run() == fresh
    assert len(spare._free) == 2 and all(any(b is k for k in spare._free) for b in kept)


def test_spare_caches_take_the_smallest_fit_and_keep_within_the_limit():
    spare = compiled.SpareCaches(limit=1000 * 4)
    a, b = torch.empty(300), torch.empty(600)
    spare.give(a, b)
    assert spare.take(250, torch.float32, a.device) is a  # the smallest that fits
    assert spare.take(250, torch.float16, a.device).numel() == 250  # no fp16 kept: a new one
    assert spare.take(700, torch.float32, a.device) is not b  # too small: a new one
    c = torch.empty(500)
    spare.give(c)  # c (500) first, then b (600) would pass 1000 floats: b goes
    assert [x is c for x in spare._free] == [True]
    spare.give(torch.empty(2000))  # larger than the limit: not kept, c stays
    assert [x is c for x in spare._free] == [True]


@pytest.mark.skipif(compiled._gemm_address() is None, reason="no sgemm in this torch build")
def test_the_one_call_step_gives_the_per_kernel_rows_bit_for_bit(gqa_model, monkeypatch):
    # decode_step makes the per-kernel step's calls in C, its products by the sgemm torch.mm
    # calls: the same rows to the last bit, rows finishing and the cache compacting on the way
    prompts = _prompts(23, gqa_model.config.vocab_size, seed=31, hi=20)
    params = [
        SamplingParams(temperature=0.0 if i % 4 == 0 else 1.0, max_new_tokens=3 + i, stop_ids=(9,))
        for i in range(len(prompts))
    ]
    used = []
    step = compiled.FusedLlama.step

    def spy(self, *a):
        used.append(self.whole is not None)
        return step(self, *a)

    monkeypatch.setattr(compiled.FusedLlama, "step", spy)
    one = sample(gqa_model, prompts, params, torch.Generator().manual_seed(6), compile=True)
    assert used and all(used)  # every step in one call, the compacted batches' too
    used.clear()
    monkeypatch.setattr(compiled.FusedLlama, "_tables", lambda self, *a: None)
    per_kernel = sample(gqa_model, prompts, params, torch.Generator().manual_seed(6), compile=True)
    assert used and not any(used)
    assert [(c.ids, c.logprobs, c.finish_reason) for c in one] == [
        (c.ids, c.logprobs, c.finish_reason) for c in per_kernel
    ]


def test_trainer_kernels_follow_the_decoding_head_size(monkeypatch):
    # a rollout's prefill runs the trainer's norms before any training step: they come from
    # the trainer's library for the decoding library's head size, so it is built once
    monkeypatch.setattr(compiled, "_libs", {})
    compiled.kernels(32)
    lib = compiled.trainer_kernels()
    assert set(compiled._libs) == {("decode", 32, False), ("train", 32, False)}
    assert compiled.kernels(32, "train") is lib


def test_fused_step_under_a_float64_default_dtype(gqa_model):
    # the rows' temperatures are built in torch's default dtype, the fused kernel reads fp32
    # temperatures and uniforms: a float64 default gives the same rows as the float32 one
    prompts = _prompts(6, gqa_model.config.vocab_size, seed=12)
    params = [
        SamplingParams(temperature=0.0 if i % 3 else 0.8, max_new_tokens=10 + i) for i in range(6)
    ]
    want = sample(gqa_model, prompts, params, torch.Generator().manual_seed(3), compile=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = sample(gqa_model, prompts, params, torch.Generator().manual_seed(3), compile=True)
    finally:
        torch.set_default_dtype(default)
    _assert_same(want, got)  # the first token's log-prob is the eager step's, in float64
