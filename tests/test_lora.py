"""LoRA through peft: merged weights for vLLM and final/, sampling from the adapted model,
and `aha zero` / `aha sft` training adapters only (skipped without peft)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from ahamoment import lora
from ahamoment.models import load_model, save_model
from ahamoment.rollout import SamplingParams, sample
from ahamoment.rollout.hf_engine import HFEngine
from ahamoment.rollout.sampler import TorchEngine
from ahamoment.rollout.vllm_engine import sync_payload
from ahamoment.stages.sft import SFTConfig, sft
from ahamoment.stages.zero import ZeroConfig, zero

peft = pytest.importorskip("peft")

TARGETS = "q_proj,v_proj,up_proj"


def _adapted(tiny_model, seed: int = 0):
    """The tiny model with rank-4 adapters whose B is random (fresh LoRA has B = 0: no-op)."""
    model = lora.wrap(copy.deepcopy(tiny_model), 4, 8.0, TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_merged_weights_are_peft_merge_under_plain_names(tiny_model):
    model = _adapted(tiny_model)
    merged = lora.merged_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()  # peft's own merge
    assert merged.keys() == tiny_model.state_dict().keys() == reference.keys()
    changed = 0
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)  # W + B@A*alpha/r, one add
        changed += not torch.equal(v, tiny_model.state_dict()[k])
    # q, v and up projections of 2 layers changed, nothing else
    assert changed == 3 * 2
    # the trainer's weights are untouched: the adapted model still holds base + adapters
    again = lora.merged_state_dict(model.get_base_model())
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    # what the vLLM engine pushes through load_weights: the same names and tensors
    payload = dict(sync_payload(lora.sampling_model(model)))
    assert payload.keys() == merged.keys()
    assert all(torch.equal(payload[k], merged[k]) for k in merged)
    # no LoRA: the plain state dict
    assert lora.merged_state_dict(tiny_model).keys() == tiny_model.state_dict().keys()


def test_sampling_the_adapted_model_equals_the_merged_model(tiny_model, tiny_tokenizer, tmp_path):
    model = _adapted(tiny_model, seed=1).eval()
    lora.save_merged(model, tiny_tokenizer, tmp_path / "merged")
    plain = load_model(tmp_path / "merged").eval()
    assert not lora.is_lora(plain)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(0.0, 1.0, 0, 12)  # greedy: same weights give the same tokens
    ours = sample(lora.sampling_model(model), prompts, params)
    ref = sample(plain, prompts, params)
    assert [c.ids for c in ours] == [c.ids for c in ref]
    for a, b in zip(ours, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("engine_cls", [TorchEngine, HFEngine])
def test_engine_decodes_a_merged_copy_kept_in_sync(
    engine_cls, tiny_model, tiny_tokenizer, tmp_path
):
    # `aha zero` with LoRA gives an in-process engine lora.merged_copy (one matmul per
    # projection) and refreshes it with engine.sync_weights(policy) after each optimizer step.
    assert engine_cls.decodes_module
    base = tmp_path / "base"
    save_model(tiny_model, tiny_tokenizer, base)
    model = _adapted(tiny_model, seed=2).eval()
    engine = engine_cls(lora.merged_copy(model, base), tiny_tokenizer)
    assert not lora.is_lora(engine.model)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(0.0, 1.0, 0, 12)

    def agree() -> None:
        ours = sample(engine.model, prompts, params)
        ref = sample(lora.sampling_model(model), prompts, params)
        assert [c.ids for c in ours] == [c.ids for c in ref]
        for a, b in zip(ours, ref):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)

    agree()
    with torch.no_grad():  # an optimizer step moves the adapters; the copy is now stale
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.mul_(-1.5)
    stale = sample(engine.model, prompts, params)
    assert [c.ids for c in stale] != [
        c.ids for c in sample(lora.sampling_model(model), prompts, params)
    ]
    engine.sync_weights(lora.sampling_model(model))
    agree()
    # the trainer's adapted model is untouched by the sync
    assert lora.is_lora(model) and any("lora_A" in n for n, _ in model.named_parameters())


def _trained_keys(before: dict, after_dir) -> set[str]:
    after = load_file(str(after_dir / "model.safetensors"))
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_zero_and_sft_train_adapters_and_save_a_merged_model(tiny_model, tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    save_model(tiny_model, tiny_tokenizer, base)
    before = load_file(str(base / "model.safetensors"))
    lora_args = dict(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS, threads=1)
    common = dict(
        **lora_args, steps=2, prompts_per_step=2,
        group_size=4, max_new_tokens=8, heldout_n=2, eval_k=1, eval_every=0, real_eval=False,
        save_every=1, lr=5e-2, warmup=1, reward="reward_plugin:length_penalty",
    )  # fmt: skip
    run = tmp_path / "zero"
    zero(
        ZeroConfig(
            model=str(base),
            out=str(run),
            **common,
        )
    )
    # only adapted projections moved in the merged final model; checkpoints hold adapters only
    moved = _trained_keys(before, run / "final")
    assert moved and all(any(t in k for t in TARGETS.split(",")) for k in moved), moved
    ckpt = run / "checkpoints" / "step-2"
    assert (ckpt / "adapter_model.safetensors").exists()
    assert not (ckpt / "model.safetensors").exists()
    # resume from the adapter checkpoint of step 1: the same final weights
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(run / "checkpoints" / "step-1", cut / "checkpoints" / "step-1")
    shutil.copy(run / "base_eval.json", cut / "base_eval.json")
    zero(
        ZeroConfig(
            model=str(base),
            out=str(cut),
            resume=True,
            **common,
        )
    )
    a = load_file(str(run / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

    data = tmp_path / "data.jsonl"
    rng = random.Random(0)
    rows = [{"prompt": f"User: {rng.randint(1, 99)}?", "completion": "<think>x</think>"}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = sft(SFTConfig(data=str(data), model=str(base), out=str(tmp_path / "sft"), epochs=1,
                      batch_size=4, lr=5e-2, warmup=1, heldout_n=0, **lora_args))  # fmt: skip
    assert s["steps"] == 2
    moved = _trained_keys(before, tmp_path / "sft" / "final")
    assert moved and all(any(t in k for t in TARGETS.split(",")) for k in moved), moved


def test_bad_lora_settings_are_rejected():
    with pytest.raises(ValueError, match="lora_rank"):
        ZeroConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="lora_targets"):
        ZeroConfig(lora_rank=8, lora_targets=" , ")
