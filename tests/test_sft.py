"""`aha sft`: prompt masking by hand, packed == unpacked, resume == uninterrupted, bad rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ahamoment import cli
from ahamoment.data import DataError
from ahamoment.models import save_model
from ahamoment.stages.sft import IGNORE, SFTConfig, collate, encode_pair, load_pairs, sft, sft_loss


class _Tok:
    """Whitespace 'tokenizer' over a fixed vocabulary, so ids are known by hand."""

    eos_token_id = 9
    vocab = {w: i for i, w in enumerate("a b c d e f g h x".split())}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[w] for w in text.split()]}


def test_prompt_tokens_carry_no_loss_by_hand(tiny_model):
    ids, labels = encode_pair(_Tok(), "a b c", "d e", max_len=16)
    assert ids == [0, 1, 2, 3, 4, 9]
    assert labels == [IGNORE, IGNORE, IGNORE, 3, 4, 9]
    batch = collate([(ids, labels)], pad_id=0, pack=False, pack_len=16)
    # shifted: position t predicts token t+1; only positions 2, 3, 4 (predicting d, e, EOS)
    assert batch.targets[0].tolist() == [IGNORE, IGNORE, 3, 4, 9, IGNORE]
    with torch.no_grad():
        loss = sft_loss(tiny_model, batch)
        logp = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0], -1)  # (6, V)
    by_hand = -(logp[2, 3] + logp[3, 4] + logp[4, 9]) / 3
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_packed_batch_gives_the_unpacked_loss(tiny_model):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n_prompt, n_comp in [(5, 3), (9, 7), (3, 2), (12, 4), (4, 10)]:
        ids = torch.randint(3, 200, (n_prompt + n_comp,), generator=g).tolist()
        seqs.append((ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    padded = collate(seqs, pad_id=0, pack=False, pack_len=16)
    packed = collate(seqs, pad_id=0, pack=True, pack_len=24)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # really packed: fewer rows
    assert packed.n_targets() == padded.n_targets()
    with torch.no_grad():
        a, b = sft_loss(tiny_model, padded), sft_loss(tiny_model, packed)
        # and each sequence on its own, weighted by its target count
        alone = [collate([s], 0, False, 16) for s in seqs]
        ref = sum(sft_loss(tiny_model, x) * x.n_targets() for x in alone) / padded.n_targets()
    # fp32 sums of the same terms in another order: agree to ~1e-6
    assert a.item() == pytest.approx(ref.item(), abs=1e-5)
    assert b.item() == pytest.approx(ref.item(), abs=1e-5)


def _data(tmp_path: Path, n: int = 24) -> str:
    rows = [
        {"prompt": f"User: add {i} and 1. Assistant:", "completion": f"<think>{i}+1</think>"}
        for i in range(n)
    ]
    rows[3] = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    }
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def tiny_dir(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "model"
    save_model(tiny_model, tiny_tokenizer, d)
    return str(d)


def _cfg(data, model, out, **kw) -> SFTConfig:
    base = dict(
        data=data, model=model, out=out, epochs=2, batch_size=8, lr=1e-2, warmup=2,
        heldout_n=0, threads=1, save_every=3, keep_checkpoints=10,
    )  # fmt: skip
    return SFTConfig(**(base | kw))


def test_resume_equals_uninterrupted(tmp_path, tiny_dir):
    data = _data(tmp_path)
    full = tmp_path / "full"
    s = sft(_cfg(data, tiny_dir, str(full)))
    assert s["steps"] == 6  # 24 rows / 8 = 3 steps per epoch, 2 epochs
    # an interrupted run: only what existed at step 3 (config + checkpoint + its metrics rows)
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", cut / "checkpoints" / "step-3")
    sft(_cfg(data, tiny_dir, str(cut), resume=True))
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    loss = [json.loads(ln)["loss"] for ln in (cut / "metrics.jsonl").open()]
    assert len(loss) == 3  # steps 4..6 logged by the resumed run


def test_loss_falls_and_packing_follows_the_same_path(tmp_path, tiny_dir):
    data = _data(tmp_path)
    a = sft(_cfg(data, tiny_dir, str(tmp_path / "a"), pack=True, save_every=0))
    b = sft(_cfg(data, tiny_dir, str(tmp_path / "b"), pack=False, save_every=0))
    la = [json.loads(ln)["loss"] for ln in (tmp_path / "a" / "metrics.jsonl").open()]
    lb = [json.loads(ln)["loss"] for ln in (tmp_path / "b" / "metrics.jsonl").open()]
    assert la[-1] < la[0]
    # same sequences per step, only the layout differs: the trajectories agree to fp32 noise
    assert la == pytest.approx(lb, abs=1e-4)
    assert a["steps"] == b["steps"]


def test_bad_rows_name_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected string fields"):
        load_pairs([path], tiny_tokenizer)
    path.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'messages' must"):
        load_pairs([path], tiny_tokenizer)
    path.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_pairs([path], tiny_tokenizer)


def test_cli_reports_bad_data_with_file_and_line(tmp_path, tiny_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "no"}\n')
    rc = cli.main(["sft", "--data", str(path), "--model", tiny_dir, "--out", str(tmp_path / "o"),
                   "--threads", "1", "--heldout-n", "0"])  # fmt: skip
    assert rc == 2
    assert "bad.jsonl:1:" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_aha_sft_cli_trains_evaluates_and_writes_a_summary(tmp_path, tiny_dir):
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ahamoment.cli", "sft", "--data", _data(tmp_path), "--model",
           tiny_dir, "--out", str(out), "--epochs", "1", "--batch-size", "8", "--heldout-n", "4",
           "--eval-k", "2", "--max-new-tokens", "16", "--no-real-eval", "--threads", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["heldout"]["n"] == 4
    assert summary["heldout"]["settings"]["k"] == 2
    assert (out / "final" / "config.json").exists()
    assert "held-out pass@1" in done.stdout


@pytest.mark.parametrize("pack", [False, True])
def test_shared_prefix_gives_the_same_loss_and_gradients(tiny_model, pack):
    g = torch.Generator().manual_seed(1)
    head = torch.randint(3, 200, (12,), generator=g).tolist()  # the prefix all rows share
    seqs = []
    for n_prompt, n_comp in [(3, 4), (6, 9), (1, 2), (8, 5)]:
        ids = head + torch.randint(3, 200, (n_prompt + n_comp,), generator=g).tolist()
        seqs.append((ids, [IGNORE] * (12 + n_prompt) + ids[12 + n_prompt :]))
    plain = collate(seqs, pad_id=0, pack=pack, pack_len=24)
    shared = collate(seqs, pad_id=0, pack=pack, pack_len=24, share_prefix=True)
    # the last shared token must not predict a target: sequence 3's prompt is one token long
    assert len(shared.prefix_ids) == 12 and len(plain.prefix_ids) == 0
    assert shared.input_ids.shape[1] < plain.input_ids.shape[1]
    assert shared.n_targets() == plain.n_targets()
    _assert_same_loss_and_gradients(tiny_model, plain, shared, denominator=10.0)


def _assert_same_loss_and_gradients(model, a, b, denominator: float) -> None:
    """``sft_loss`` of batches ``a`` and ``b`` and its gradients agree to fp32 rounding."""
    out = []
    for batch in (a, b):
        model.zero_grad()
        loss = sft_loss(model, batch, denominator=denominator)
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    model.zero_grad()
    assert out[1][0] == pytest.approx(out[0][0], abs=1e-5)
    for x, y in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "seqs, expected",
    [
        # common prefix of 9 tokens, all prompt: shared
        ([(list(range(12)), [IGNORE] * 10 + [10, 11]), (list(range(9)) + [50, 51, 52], [IGNORE] * 10 + [51, 52])], 9),
        # the prefix would include a target position: cut back to the last token before it
        ([(list(range(12)), [IGNORE] * 9 + [9, 10, 11]), (list(range(12)), [IGNORE] * 9 + [9, 10, 11])], 8),
        # too short to be worth a forward of its own
        ([(list(range(12)), [IGNORE] * 10 + [10, 11]), ([0, 1, 2, 99], [IGNORE] * 3 + [99])], 0),
    ],
)  # fmt: skip
def test_shared_prefix_length(seqs, expected):
    from ahamoment.stages.sft import shared_prefix_len

    assert shared_prefix_len(seqs) == expected


@pytest.mark.parametrize("share_prefix", [False, True])
def test_stream_layout_gives_the_rows_loss_and_gradients(tiny_model, share_prefix):
    """The packed stream (no padding, targets only scored) against the padded rows path."""
    from ahamoment.stages.sft import StreamBatch, stream_layout

    g = torch.Generator().manual_seed(2)
    head = torch.randint(3, 200, (10,), generator=g).tolist()
    seqs = []
    for n_prompt, n_comp in [(3, 4), (6, 9), (1, 2), (8, 5), (2, 11)]:
        ids = head + torch.randint(3, 200, (n_prompt + n_comp,), generator=g).tolist()
        seqs.append((ids, [IGNORE] * (10 + n_prompt) + ids[10 + n_prompt :]))
    stream = stream_layout(seqs, share_prefix)
    assert isinstance(stream, StreamBatch)
    assert len(stream.heads[0]) == (10 if share_prefix else 1)
    rows = collate(seqs, pad_id=0, pack=False, pack_len=24)
    assert stream.n_targets() == rows.n_targets() == 4 + 9 + 2 + 5 + 11
    assert stream.cells() < rows.cells()
    # padding: none in the stream; in the rows, every position past each sequence's end
    assert stream.pad_cells(seqs) == 0
    assert rows.pad_cells(seqs) == rows.cells() - sum(len(ids) for ids, _ in seqs) > 0
    _assert_same_loss_and_gradients(tiny_model, rows, stream, denominator=7.0)


def test_stream_layout_scores_targets_only_by_hand(tiny_model):
    """Prompt 'a b c', completion 'd e' + EOS: three log-probs, those of d, e and EOS."""
    from ahamoment.stages.sft import stream_layout

    ids, labels = encode_pair(_Tok(), "a b c", "d e", max_len=16)
    batch = stream_layout([(ids, labels)], share_prefix=True)
    assert batch.heads == [[0]] and batch.rests == [[1, 2, 3, 4, 9]]
    assert batch.score_from == [2]  # rest token 2 is 'd', the first target
    with torch.no_grad():
        loss = sft_loss(tiny_model, batch)
        logp = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0], -1)  # (6, V)
    by_hand = -(logp[2, 3] + logp[3, 4] + logp[4, 9]) / 3
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_stream_runs_only_where_the_packed_forward_does(tiny_model):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ahamoment.stages.sft import runs_as_stream

    one = SimpleNamespace(distributed_type=DistributedType.NO)
    assert runs_as_stream(SFTConfig(data="x"), tiny_model, one)
    assert not runs_as_stream(SFTConfig(data="x", stream=False), tiny_model, one)
    assert not runs_as_stream(SFTConfig(data="x", gradient_checkpointing=True), tiny_model, one)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        acc = SimpleNamespace(distributed_type=sharded)
        assert not runs_as_stream(SFTConfig(data="x"), tiny_model, acc)
