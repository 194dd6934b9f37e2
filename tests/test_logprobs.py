"""Shared-prompt log-probs equal one unpadded full forward per row, in value and gradient.

Every test runs on both ways of computing them: ``packed`` (the default for Llama-style models:
completions concatenated with no padding, attention a few rows per call) and ``hf`` (the
model's own forward over the gathered prompt cache and padded completions)."""

import copy
import random

import pytest
import torch

from ahamoment import logprobs as LP
from ahamoment.logprobs import completion_logprobs, completion_logprobs_full
from tests_support import gqa_llama, gqa_qwen2


@pytest.fixture(params=["packed", "hf"], autouse=True)
def path(request, monkeypatch):
    if request.param == "hf":
        monkeypatch.setattr(LP, "_packable", lambda model, prompts, completions: None)
    else:  # make sure the packed path is the one under test
        real = LP._packable
        monkeypatch.setattr(
            LP, "_packable", lambda *a: real(*a) or pytest.fail("packed path not taken")
        )
    return request.param


def _batch(vocab, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(7, vocab) for _ in range(rng.randint(4, 9))] for _ in range(3)]
    rows_p, rows_c = [], []
    for p in prompts:
        for _ in range(3):  # groups of 3 rows share a prompt
            rows_p.append(p)
            rows_c.append([rng.randrange(7, vocab) for _ in range(rng.randint(1, 6))])
    return rows_p, rows_c


def test_values_match_unpadded_forward(tiny_model):
    p, c = _batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        shared, mask, _ = completion_logprobs(tiny_model, p, c, temperature=0.8)
        ref, ref_mask = completion_logprobs_full(tiny_model, p, c, temperature=0.8)
    assert torch.equal(mask, ref_mask)
    # float32 sums over different shapes: agreement to ~1e-6 is expected, 1e-5 is tight enough
    torch.testing.assert_close(shared, ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_unpadded_forward(tiny_model):
    p, c = _batch(tiny_model.config.vocab_size, seed=1)
    weights = torch.randn(len(c), 6)

    def grads(fn):
        tiny_model.zero_grad()
        logp, mask = fn()[:2]
        (logp * weights[:, : logp.shape[1]] * mask).sum().backward()
        return [q.grad.clone() for q in tiny_model.parameters()]

    g_shared = grads(lambda: completion_logprobs(tiny_model, p, c))
    g_ref = grads(lambda: completion_logprobs_full(tiny_model, p, c))
    for a, b in zip(g_shared, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    tiny_model.zero_grad()


@pytest.mark.parametrize("gather_once", [True, False])
@pytest.mark.parametrize("bucket", [1, 2, 100])
def test_rows_per_attention_call_change_nothing(tiny_model, monkeypatch, bucket, gather_once):
    """The packed path attends a few rows per call, padded to the bucket's longest; any bucket
    size, gathered once per layer or per bucket, gives the values and gradients of one full
    forward per row (the hf path ignores it)."""
    monkeypatch.setattr(LP._RowBuckets, "BUCKET", bucket)
    monkeypatch.setattr(LP._RowBuckets, "GATHER_ONCE", gather_once)
    p, c = _batch(tiny_model.config.vocab_size, seed=3)
    weights = torch.randn(len(c), 6)
    out = {}
    for name, fn in (("ours", completion_logprobs), ("ref", completion_logprobs_full)):
        tiny_model.zero_grad()
        logp, mask = fn(tiny_model, p, c)[:2]
        (logp * weights[:, : logp.shape[1]] * mask).sum().backward()
        out[name] = [logp.detach()] + [q.grad.clone() for q in tiny_model.parameters()]
    tiny_model.zero_grad()
    for a, b in zip(out["ours"], out["ref"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_entropy_only_at_real_tokens(tiny_model):
    p, c = _batch(tiny_model.config.vocab_size, seed=2)
    with torch.no_grad():
        logp, mask, ent = completion_logprobs(tiny_model, p, c, temperature=0.9, with_entropy=True)
        # each row's entropy from an unpadded forward
        for i, (pi, ci) in enumerate(zip(p, c)):
            logits = tiny_model(input_ids=torch.tensor([pi + ci])).logits[0, len(pi) - 1 : -1]
            lp = torch.log_softmax(logits.float() / 0.9, -1)
            torch.testing.assert_close(
                ent[i, : len(ci)], -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=1e-5
            )
    assert ent.shape == mask.shape and torch.all(ent[mask == 0] == 0)
    assert not ent.requires_grad


def test_width_pads_only_to_the_longest_row_given(tiny_model):
    p, c = _batch(tiny_model.config.vocab_size, seed=3)
    with torch.no_grad():
        full, mask, _ = completion_logprobs(tiny_model, p, c)
        short = [i for i, ci in enumerate(c) if len(ci) < max(map(len, c))][:3]
        part, pmask, _ = completion_logprobs(
            tiny_model, [p[i] for i in short], [c[i] for i in short]
        )
    W = max(len(c[i]) for i in short)
    assert part.shape == (len(short), W)
    torch.testing.assert_close(part, full[short, :W], atol=1e-5, rtol=1e-5)
    assert torch.equal(pmask, mask[short, :W])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_grouped_query_models_match_in_value_and_gradient(kind):
    model = (gqa_llama if kind == "llama" else gqa_qwen2)().train()
    p, c = _batch(64, seed=4)
    c[1], c[4] = [9], []  # a one-token and an empty completion: nothing in the stream
    weights = torch.randn(len(c), 6)
    out = {}
    for name, fn in (("ours", completion_logprobs), ("ref", completion_logprobs_full)):
        model.zero_grad()
        logp, mask = fn(model, p, c, temperature=0.7)[:2]
        (logp * weights[:, : logp.shape[1]] * mask).sum().backward()
        out[name] = logp.detach(), mask, [q.grad.clone() for q in model.parameters()]
    torch.testing.assert_close(out["ours"][0], out["ref"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["ours"][1], out["ref"][1])
    for a, b in zip(out["ours"][2], out["ref"][2]):  # float32, logits spread wide: ~1e-5 noise
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_lora_adapters_get_the_same_gradients(tiny_model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(copy.deepcopy(tiny_model), config)
    for n, q in model.named_parameters():  # B starts at 0: move it so A gets a gradient too
        if "lora_B" in n:
            torch.nn.init.normal_(q, std=0.1)
    p, c = _batch(tiny_model.config.vocab_size, seed=5)
    grads = {}
    for name, fn in (("ours", completion_logprobs), ("ref", completion_logprobs_full)):
        model.zero_grad()
        logp, mask = fn(model, p, c)[:2]
        (logp * mask).sum().backward()
        grads[name] = {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}
    assert grads["ours"] and all("lora_" in n for n in grads["ours"])
    for n, g in grads["ours"].items():
        torch.testing.assert_close(g, grads["ref"][n], atol=1e-5, rtol=1e-4)


def test_all_empty_completions_give_zeros(tiny_model):
    logp, mask, ent = completion_logprobs(tiny_model, [[5, 6], [5, 6]], [[], []], with_entropy=True)
    assert logp.shape == mask.shape == ent.shape == (2, 1)
    assert not logp.any() and not mask.any() and not ent.any()


def test_score_from_keeps_the_scored_columns_and_zeroes_the_rest(tiny_model):
    p, c = _batch(tiny_model.config.vocab_size, seed=5)
    start = [min(i % 3, len(ci)) for i, ci in enumerate(c)]
    with torch.no_grad():
        full, mask, ent = completion_logprobs(tiny_model, p, c, with_entropy=True)
        part, pmask, pent = completion_logprobs(
            tiny_model, p, c, with_entropy=True, score_from=start
        )
    keep = torch.arange(mask.shape[1])[None] >= torch.tensor(start)[:, None]
    assert torch.equal(pmask, mask * keep)
    torch.testing.assert_close(part, full * keep, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pent, ent * keep, atol=1e-6, rtol=1e-6)
