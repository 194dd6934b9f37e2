"""Old-policy log-probs from the sampler (``OLD_LOGP["sampler"]``) against a trainer forward."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from ahamoment.prompts import encode_prompts, stop_ids
from ahamoment.rl.rollouts import Rollout
from ahamoment.rl.update import OLD_LOGP, TrainBatch, anchor, policy_update
from ahamoment.rollout import Completion, Request, SamplingParams, TorchEngine
from ahamoment.stages.zero import ZeroConfig
from ahamoment.tasks import get_task

G, GROUPS = 4, 3


def _sampled(model, tokenizer) -> Rollout:
    """G completions for each of GROUPS prompts, drawn by the torch engine from ``model``."""
    task, rng = get_task("countdown"), random.Random(5)
    problems = [task.sample(rng) for _ in range(GROUPS)]
    prompts = encode_prompts(tokenizer, problems)
    params = SamplingParams(1.0, 1.0, 0, 40, stop_ids(tokenizer))
    engine = TorchEngine(model, tokenizer)
    groups = engine.generate(
        [Request(p, params, G) for p in prompts], torch.Generator().manual_seed(3)
    )
    rows = [i for i in range(GROUPS) for _ in range(G)]
    comps = [c for g in groups for c in g]
    assert sum(len(c.ids) for c in comps) > GROUPS * G  # not all empty
    return Rollout([problems[i] for i in rows], [list(prompts[i]) for i in rows], comps)


def _settings(source: str):
    """Two optimizer steps per batch (so old log-probs are needed), from ``source``."""
    cfg = ZeroConfig(prompts_per_step=GROUPS, group_size=G, kl_coef=0.0, minibatches=2)
    return replace(cfg.update_settings(0), old_logp=source)


def test_the_samplers_log_probs_are_the_trainers_forward_to_float_rounding(
    tiny_model, tiny_tokenizer
):
    batch = _sampled(tiny_model, tiny_tokenizer)
    rewards = torch.zeros(len(batch))
    by_sampler = _settings("sampler")
    by_forward = _settings("forward")
    old_s = anchor(tiny_model, None, batch, rewards, by_sampler, "loss").old_logp  # (B, Lc)
    old_f = anchor(tiny_model, None, batch, rewards, by_forward, "loss").old_logp
    assert old_s.shape == old_f.shape == (len(batch), max(len(c.ids) for c in batch.completions))
    for i, c in enumerate(batch.completions):  # exactly what the sampler drew with, padded by 0
        assert old_s[i, : len(c.ids)].tolist() == pytest.approx(c.logprobs, abs=0)
        assert old_s[i, len(c.ids) :].abs().sum() == 0
    assert old_f.abs().sum() > 1
    torch.testing.assert_close(old_s, old_f, rtol=0, atol=1e-5)


def test_two_minibatches_take_the_same_steps_from_either_source(tiny_model, tiny_tokenizer):
    batch = _sampled(tiny_model, tiny_tokenizer)
    rewards = torch.zeros(len(batch))
    after = {}
    for source in ("sampler", "forward"):
        settings = _settings(source)
        model = copy.deepcopy(tiny_model).train()
        old = anchor(model, None, batch, rewards, settings, "loss").old_logp
        acc = Accelerator(cpu=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model, opt = acc.prepare(model, opt)
        adv = torch.linspace(-1, 1, len(batch))  # (B,) any fixed advantages
        tb = TrainBatch(batch, adv, torch.ones(len(batch), dtype=torch.bool), old, None)
        policy_update(model, opt, acc, tb, settings, torch.Generator().manual_seed(1))
        after[source] = acc.unwrap_model(model).state_dict()
    start = tiny_model.state_dict()
    assert max((after["forward"][k] - start[k]).abs().max() for k in start) > 1e-3  # it moved
    for k in start:
        torch.testing.assert_close(after["sampler"][k], after["forward"][k], rtol=0, atol=1e-5)


def test_a_completion_without_its_log_probs_is_an_error(tiny_model):
    batch = Rollout(
        [None], [[1, 2]], [Completion(ids=[3, 4], logprobs=[-0.5], finish_reason="stop")]
    )
    settings = _settings("sampler")
    with pytest.raises(ValueError, match="without its log-probs"):
        OLD_LOGP.get("sampler")(tiny_model, batch, settings, None)


def test_auto_takes_the_sampler_only_where_it_decoded_the_current_weights():
    assert ZeroConfig().old_logp_source() == "sampler"  # the README recipe: in-process torch
    assert ZeroConfig(engine="hf").old_logp_source() == "sampler"
    assert ZeroConfig(engine="vllm").old_logp_source() == "forward"  # other kernels, bf16
    assert ZeroConfig(tis_cap=2.0).old_logp_source() == "forward"  # TIS compares the two
    assert ZeroConfig(bf16=True).old_logp_source() == "forward"  # autocast rounds otherwise
    # a half key/value cache: its log-probs are the behaviour policy's own (rounding apart)
    assert ZeroConfig(kv_cache="float16").old_logp_source() == "sampler"
    assert ZeroConfig(kv_cache="float16").rollout_engine() == ("torch", {"kv_cache": "float16"})
    assert ZeroConfig().rollout_engine() == ("torch", {})
    with pytest.raises(ValueError, match="--kv-cache float16 needs --engine torch or torch-eager"):
        ZeroConfig(kv_cache="float16", engine="hf")
    with pytest.raises(ValueError, match="kv_cache: 'half' is not one of model, float16"):
        ZeroConfig(kv_cache="half")
    assert ZeroConfig(old_logp="forward").old_logp_source() == "forward"
    with pytest.raises(ValueError, match="--old-logp forward"):
        ZeroConfig(old_logp="sampler", tis_cap=2.0)
    with pytest.raises(ValueError, match="--old-logp forward"):
        ZeroConfig(old_logp="sampler", rollout_server="http://127.0.0.1:1")
    with pytest.raises(Exception, match="unknown old-policy log-prob source"):
        ZeroConfig(old_logp="samplr")


def test_bf16_autocast_reaches_the_packed_forwards(tiny_model, tiny_tokenizer):
    # the packed path calls the layers directly, past the autocast accelerate puts around the
    # model's forward: with --bf16 the trainer's forwards (update and anchors) must still round
    # in bf16, so they part from the fp32 sampler, and the old log-probs round as the update
    batch = _sampled(tiny_model, tiny_tokenizer)
    rewards = torch.zeros(len(batch))
    mismatch, olds = {}, {}
    for bf16 in (False, True):
        settings = replace(_settings("forward"), bf16=bf16, minibatches=1)
        olds[bf16] = anchor(tiny_model, tiny_model, batch, rewards, settings, "loss").ref_logp
        model = copy.deepcopy(tiny_model).train()
        acc = Accelerator(cpu=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = acc.prepare(model, opt)
        adv = torch.linspace(-1, 1, len(batch))
        tb = TrainBatch(batch, adv, torch.ones(len(batch), dtype=torch.bool), None, None)
        stats = policy_update(model, opt, acc, tb, settings, torch.Generator())
        mismatch[bf16] = stats["sampler_mismatch"]
    assert mismatch[False] < 1e-5 < 1e-4 < mismatch[True] < 0.5
    assert olds[True].dtype == torch.float32
    assert (olds[True] - olds[False]).abs().max() > 1e-4  # the reference forward rounds too
