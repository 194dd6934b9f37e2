import random

import torch

from ahamoment import checkpoint


def _opt(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    return opt, sched


def test_save_keeps_newest_and_ignores_partial(tiny_model, tiny_tokenizer, tmp_path):
    opt, sched = _opt(tiny_model)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, tiny_model, tiny_tokenizer, opt, sched, {"x": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    (tmp_path / "step-9.tmp").mkdir()  # a write interrupted by kill -9
    (tmp_path / "step-8").mkdir()  # a folder without state.json is not a checkpoint
    assert checkpoint.latest(tmp_path).name == "step-3"


def test_restores_optimizer_scheduler_and_rng(tiny_model, tiny_tokenizer, tmp_path):
    opt, sched = _opt(tiny_model)
    tiny_model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    sched.step()
    random.seed(7)
    torch.manual_seed(7)
    path = checkpoint.save(tmp_path, 5, tiny_model, tiny_tokenizer, opt, sched, {"run": "r"})
    expected = (random.random(), torch.rand(3))
    opt2, sched2 = _opt(tiny_model)
    state = checkpoint.load_trainer_state(path, opt2, sched2)
    assert state == {"step": 5, "run": "r"}
    assert (random.random(), *torch.rand(3).tolist()) == (expected[0], *expected[1].tolist())
    assert sched2.last_epoch == sched.last_epoch == 1
    for a, b in zip(opt.state.values(), opt2.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=0, atol=0)
    tiny_model.zero_grad()
