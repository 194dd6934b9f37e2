"""Options of `aha zero` that only a run exercises: the reference refresh (save, resume) and
the KL placement, each through the stage function on a tiny model."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

import placement_plugin
from ahamoment.models import save_model
from ahamoment.stages.zero import ZeroConfig, zero

COMMON = dict(
    steps=4, prompts_per_step=2, group_size=4, max_new_tokens=8, overlong_buffer=4,
    heldout_n=2, eval_k=1, eval_every=0, real_eval=False, lora_rank=0, micro_batch=0,
    lr=5e-2, warmup=1, lr_decay=0, kl_coef=0.5, save_every=2, threads=1, minibatches=1,
    reward="reward_plugin:length_penalty",  # every completion differs: advantages are never 0
)  # fmt: skip


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _base(tiny_model, tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    save_model(tiny_model, tiny_tokenizer, base)
    return base


def test_reference_refresh_saves_the_policy_and_resumes_from_it(
    tiny_model, tiny_tokenizer, tmp_path
):
    base = _base(tiny_model, tiny_tokenizer, tmp_path)
    run = tmp_path / "refresh"
    zero(ZeroConfig(model=str(base), out=str(run), ref_refresh=2, **COMMON))
    # at steps 2 and 4 the reference became the policy, and each checkpoint holds that copy
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step-{step}"
        policy, ref = _weights(ckpt), _weights(ckpt / "reference")
        assert all(torch.equal(policy[k], ref[k]) for k in policy)
    # without a refresh the reference stays the base, and training ends elsewhere
    fixed = tmp_path / "fixed"
    zero(ZeroConfig(model=str(base), out=str(fixed), **COMMON))
    assert not (fixed / "checkpoints" / "step-2" / "reference").exists()
    a, b = _weights(run / "final"), _weights(fixed / "final")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # resuming at step 2 loads the refreshed reference: the same final weights as one run
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    shutil.copy(run / "base_eval.json", cut / "base_eval.json")
    zero(ZeroConfig(model=str(base), out=str(cut), ref_refresh=2, resume=True, **COMMON))
    c = _weights(cut / "final")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_kl_placement_reward_gets_the_policy_kl_and_takes_it_out_of_the_loss(
    tiny_model, tiny_tokenizer, tmp_path
):
    base = _base(tiny_model, tiny_tokenizer, tmp_path)
    placement_plugin.CALLS.clear()
    run = tmp_path / "run"
    zero(
        ZeroConfig(
            model=str(base), out=str(run), kl_placement="placement_plugin:recording", **COMMON
        )
    )
    calls = placement_plugin.CALLS
    assert len(calls) == 4 and all(c["beta"] == 0.5 for c in calls)  # once a step, with β
    # per-token KL of every row (B = 2 x 4), laid out like the completion mask
    assert all(c["rewards"] == (8,) and c["kl"] == c["mask"] and c["kl"][0] == 8 for c in calls)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the KL is still logged: 0 up to float rounding at step 1 (policy = reference), then it
    # grows as the policy leaves the reference
    assert abs(rows[0]["kl"]) < 1e-9 and rows[-1]["kl"] > 1e-6


def _mixes(run) -> list[dict[str, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("curriculum/")} for r in rows]


def test_adaptive_curriculum_logs_its_mix_and_resumes_where_it_was(
    tiny_model, tiny_tokenizer, tmp_path
):
    base = _base(tiny_model, tiny_tokenizer, tmp_path)
    opts = COMMON | dict(curriculum="adaptive", task="countdown")
    run = tmp_path / "adaptive"
    zero(ZeroConfig(model=str(base), out=str(run), **opts))
    mixes = _mixes(run)
    levels = {"n3_25_addsub", "n3_99_addsub", "n3_99_all", "n4_99_all", "n5_99_all"}
    assert all({k.split("/")[1] for k in m} == levels for m in mixes)
    assert all(abs(sum(m.values()) - 1) < 1e-9 for m in mixes)
    assert mixes[0] != mixes[-1]  # the mix moved with what the groups scored
    state = json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["curriculum"]["curriculum"] == "adaptive"
    # resumed at step 2, the curriculum continues from its saved state: the same mixes
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    shutil.copy(run / "base_eval.json", cut / "base_eval.json")
    zero(ZeroConfig(model=str(base), out=str(cut), resume=True, **opts))
    assert _mixes(cut) == mixes[2:]
