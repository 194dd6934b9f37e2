"""`policy_update` on a tiny Llama: micro-batching does not change the update, and completions
left out of the loss (``in_loss`` False) have no influence on it."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from ahamoment.rl.rollouts import Rollout
from ahamoment.rl.update import TrainBatch, policy_update
from ahamoment.rollout import Completion
from ahamoment.stages.zero import ZeroConfig

torch.set_num_threads(1)

F64 = torch.float64
NAMES = ["grpo", "dr_grpo", "dapo", "gspo"]
PAD = 0
LR = 0.5
# Two prompts x G=4 completions (lengths 1..6, max_new_tokens 6); no token is the pad id.
PROMPTS = [[1, 7, 3, 9], [2, 5, 11]]
COMPLETIONS = [
    [4, 8, 15, 16, 2],
    [6, 3],
    [12, 12, 5, 7, 9, 10],
    [13, 1, 4],
    [17, 2, 8, 3],
    [5],
    [9, 14, 6, 6, 18, 11],
    [3, 19, 7],
]
ADV = [0.9, -0.4, 1.3, -1.1, -0.8, 0.6, 1.0, -0.5]
# Fixed log(pi / pi_old) for each token (cycled), so the ratios sit on both sides of 1 and some
# tokens (or, for gspo, sequences) are clipped.
SHIFTS = [0.3, -0.25, 0.1, -0.05, 0.4, -0.35, 0.0, 0.2]


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.3,
        pad_token_id=PAD,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(F64)


def _rollout(rows: list[int] | None = None) -> Rollout:
    rows = list(range(len(COMPLETIONS))) if rows is None else rows
    comps = [COMPLETIONS[r] for r in rows]
    return Rollout(
        problems=[f"problem {r // 4}" for r in rows],  # any object will do
        prompts=[PROMPTS[r // 4] for r in rows],
        completions=[
            Completion(
                ids=c,
                logprobs=[-1.0] * len(c),
                finish_reason="length" if len(c) == 6 else "stop",
                text="",
            )
            for c in comps
        ],
    )


def _old_and_ref(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(8, 6) old-policy and reference log-probs: the start's, shifted by fixed amounts."""
    batch = _rollout()
    with torch.no_grad():
        logp, mask, _ = batch.logprobs(model, list(range(len(batch))), 1.0, PAD)
    shift = torch.tensor(SHIFTS * 6, dtype=logp.dtype)[: logp.numel()].view_as(logp)
    return (logp - shift) * mask, (logp + 0.5 * shift.flip(0)) * mask


def _update(
    model0,
    loss: str,
    minibatches: int,
    micro_batch: int,
    rows: list[int] | None = None,
    in_loss: list[bool] | None = None,
    adv: list[float] | None = None,
    old_shift: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weights after `policy_update` with plain SGD from a copy of `model0`."""
    rows = list(range(len(COMPLETIONS))) if rows is None else rows
    model = copy.deepcopy(model0)
    old, ref = _old_and_ref(model0)
    cfg = ZeroConfig(
        prompts_per_step=2,
        group_size=4,
        minibatches=minibatches,
        micro_batch=micro_batch,
        max_new_tokens=6,
        overlong_buffer=4,  # the default 64 does not fit max_new_tokens 6
        loss=loss,
        kl_coef=0.1,
        kl_estimator="k3",
        max_grad_norm=1e9,  # no clipping: the step is exactly lr * grad
    )
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    keep = torch.tensor(in_loss if in_loss is not None else [True] * len(rows))
    old_rows = old[rows] + old_shift * (~keep)[:, None].to(old.dtype)  # garbage for left-out rows
    width = max(len(COMPLETIONS[r]) for r in rows)
    batch = TrainBatch(
        rollout=_rollout(rows),
        advantages=torch.tensor(adv or [ADV[r] for r in rows], dtype=F64),
        in_loss=keep,
        old_logp=old_rows[:, :width],
        ref_logp=ref[rows][:, :width],
    )
    LAST_STATS[(loss, minibatches, micro_batch)] = policy_update(
        model,
        optimizer,
        accelerator,
        batch,
        cfg.update_settings(PAD),
        torch.Generator().manual_seed(11),  # the same minibatch order in every run
    )
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


LAST_STATS: dict[tuple[str, int, int], dict[str, float]] = {}


def _deltas(after: dict[str, torch.Tensor], model0) -> torch.Tensor:
    before = model0.state_dict()
    return torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)])


# completion_logprobs takes the log-softmax in float32 (``logits.float()``) and HF's RMSNorm
# computes in float32, so gradients carry float32 round-off: ~1e-7 relative to the log-probs.
# Updates are lr * grad with |update| up to ~1e-1; an absolute 1e-6 on the weights (which are
# float64, so the subtraction itself is exact to ~1e-16) is ~1e-5 relative to the largest step:
# tight for float32 arithmetic, yet it would catch any normalisation error (>= 1/8 relative).
ATOL = 1e-6


@pytest.mark.parametrize("minibatches", [1, 2])
@pytest.mark.parametrize("loss", NAMES)
def test_micro_batches_give_the_same_update(loss: str, minibatches: int) -> None:
    model0 = _model()
    whole = _update(model0, loss, minibatches, micro_batch=0)
    micro = _update(model0, loss, minibatches, micro_batch=1)
    moved = _deltas(whole, model0)
    assert moved.abs().max() > 1e-3  # the update is not vacuous
    torch.testing.assert_close(_deltas(micro, model0), moved, rtol=0, atol=ATOL)
    # the logged figures do not depend on the split either (gspo's clip_frac is over sequences,
    # the others' over tokens, and each micro-batch is weighted accordingly)
    for key in ("clip_frac", "kl", "entropy", "train_tokens"):
        a, b = LAST_STATS[(loss, minibatches, 0)][key], LAST_STATS[(loss, minibatches, 1)][key]
        assert abs(a - b) < 1e-6, (key, a, b)
    if minibatches == 1:  # and a split into micro-batches of 2 as well
        pairs = _update(model0, loss, minibatches, micro_batch=2)
        torch.testing.assert_close(_deltas(pairs, model0), moved, rtol=0, atol=ATOL)
        # a micro-batch larger than the minibatch is the whole minibatch in one pass
        big = _update(model0, loss, minibatches, micro_batch=64)
        torch.testing.assert_close(_deltas(big, model0), moved, rtol=0, atol=ATOL)


LEFT_OUT = [1, 5]  # rows with in_loss False (2 and 1 tokens; not the longest rows)
KEPT = [r for r in range(8) if r not in LEFT_OUT]


@pytest.mark.parametrize("loss", NAMES)
def test_left_out_rows_have_no_influence(loss: str) -> None:
    # Whatever a left-out row holds (here: a huge advantage and a shifted old log-prob that
    # would put its ratios far outside the clip range), the update is the same: its tokens are
    # masked before any arithmetic, so every path from it to the weights carries exactly 0.
    model0 = _model()
    in_loss = [r not in LEFT_OUT for r in range(8)]
    base = _update(model0, loss, 1, 0, in_loss=in_loss)
    adv = [1e3 if r in LEFT_OUT else a for r, a in enumerate(ADV)]
    garbage = _update(model0, loss, 1, 0, in_loss=in_loss, adv=adv, old_shift=5.0)
    torch.testing.assert_close(_deltas(garbage, model0), _deltas(base, model0), rtol=0, atol=0)
    # and micro-batching stays exact with left-out rows in the minibatch
    micro = _update(model0, loss, 1, 1, in_loss=in_loss)
    torch.testing.assert_close(_deltas(micro, model0), _deltas(base, model0), rtol=0, atol=ATOL)


@pytest.mark.parametrize("loss", NAMES)
def test_left_out_rows_versus_removed_rows(loss: str) -> None:
    # Removing the 2 left-out rows from the batch is not quite the same update for every loss:
    # Norm.seqs counts every sequence of the minibatch, left-out ones included (8), while
    # Norm.tokens counts only in-loss tokens. So:
    # - dapo (sum / in-loss tokens): the same update as the 6-row batch;
    # - grpo, dr_grpo, gspo (sum / 8 instead of / 6): exactly 6/8 of the 6-row batch's update
    #   (one SGD step from the same weights, and the gradient is linear in the 1/N factor).
    model0 = _model()
    in_loss = [r not in LEFT_OUT for r in range(8)]
    masked = _deltas(_update(model0, loss, 1, 0, in_loss=in_loss), model0)
    removed = _deltas(_update(model0, loss, 1, 0, rows=KEPT), model0)
    factor = 1.0 if loss == "dapo" else 6 / 8
    assert removed.abs().max() > 1e-3
    torch.testing.assert_close(masked, factor * removed, rtol=0, atol=ATOL)
    if loss != "dapo":  # and the two really differ: the seq count does include left-out rows
        assert (masked - removed).abs().max() > 100 * ATOL


def test_default_micro_batch_is_one_group() -> None:
    # micro_batch 0 splits the minibatch into groups (G = 4 rows sharing a prompt), each padded
    # to its own longest completion; the update equals one forward over the whole minibatch
    model0 = _model()
    whole = _update(model0, "grpo", 1, micro_batch=8)
    auto = _update(model0, "grpo", 1, micro_batch=0)
    torch.testing.assert_close(_deltas(auto, model0), _deltas(whole, model0), rtol=0, atol=ATOL)
    for key in ("clip_frac", "kl", "entropy", "train_tokens", "sampler_mismatch"):
        a, b = LAST_STATS[("grpo", 1, 0)][key], LAST_STATS[("grpo", 1, 8)][key]
        assert abs(a - b) < 1e-5, key


def _adamw_run(loss: str, advs: list[list[float]], skip: bool, minibatches: int = 1):
    """Weights, AdamW state and stats after one `policy_update` per advantage list, no KL."""
    model = copy.deepcopy(_model())
    cfg = ZeroConfig(
        prompts_per_step=2,
        group_size=4,
        minibatches=minibatches,
        max_new_tokens=6,
        overlong_buffer=4,
        micro_batch=0,  # one group per forward/backward
        loss=loss,
        kl_coef=0.0,
        skip_zero_adv=skip,
        max_grad_norm=1.0,
    )
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    stats = []
    for adv in advs:
        with torch.no_grad():
            old = (
                _rollout().logprobs(model, list(range(8)), 1.0, PAD)[0] if minibatches > 1 else None
            )
        stats.append(
            policy_update(
                model,
                optimizer,
                accelerator,
                TrainBatch(
                    rollout=_rollout(),
                    advantages=torch.tensor(adv, dtype=F64),
                    in_loss=torch.ones(8, dtype=torch.bool),
                    old_logp=old,
                ),
                cfg.update_settings(PAD),
                torch.Generator().manual_seed(11),
            )
        )
    state = [s["exp_avg"].clone() for s in optimizer.state.values()]
    weights = {
        k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()
    }
    return weights, state, stats


@pytest.mark.parametrize("minibatches", [1, 2])
@pytest.mark.parametrize("loss", NAMES)
def test_skipping_zero_advantage_rows_gives_the_same_update(loss: str, minibatches: int) -> None:
    # step 1: the second group has all-equal rewards (advantage exactly 0); step 2: every row
    # has advantage 0, so nothing is trained, yet AdamW's moments and weight decay still move
    advs = [[0.9, -0.4, 1.3, -1.8, 0.0, 0.0, 0.0, 0.0], [0.0] * 8]
    w_skip, m_skip, st_skip = _adamw_run(loss, advs, skip=True, minibatches=minibatches)
    w_all, m_all, st_all = _adamw_run(loss, advs, skip=False, minibatches=minibatches)
    for k in w_all:
        torch.testing.assert_close(w_skip[k], w_all[k], atol=1e-10, rtol=1e-8)
    for a, b in zip(m_skip, m_all):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert [s["train_rows_frac"] for s in st_skip] == [0.5, 0.0]
    assert [s["train_rows_frac"] for s in st_all] == [1.0, 1.0]
    assert st_skip[0]["loss"] == pytest.approx(st_all[0]["loss"], abs=1e-6)  # float32 log-probs
    before = _model().state_dict()
    assert any(not torch.equal(w_skip[k], before[k]) for k in before)  # step 2 still moved


def test_a_kl_term_or_a_plugin_loss_is_never_skipped(monkeypatch) -> None:
    from ahamoment.rl import losses

    advs = [[0.9, -0.4, 1.3, -1.8, 0.0, 0.0, 0.0, 0.0]]
    monkeypatch.delattr(losses.grpo_loss, "advantage_only")  # as a plugin without the flag
    assert _adamw_run("grpo", advs, skip=True)[2][0]["train_rows_frac"] == 1.0
