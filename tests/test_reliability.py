"""Whole-or-absent files, verified checkpoints, torn JSONL tails, exact resume of a chunk a kill
cut short, and runs on a full disk or a read-only directory (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ahamoment import atomic, checkpoint
from ahamoment.runs import RunDir
from ahamoment.stages import distill
from ahamoment.stages.distill import DistillGenerateConfig, distill_generate
from ahamoment.teachers import LocalTeacher, TeacherResult, teacher_sample
from test_distill import _solve
from test_zero_e2e import ROOT, ZERO_TINY, aha


# --- atomic files ---------------------------------------------------------------------------
def _killed_writing(path: Path, text: str, point: str) -> int:
    """Write ``text`` to ``path`` in a child that SIGKILLs itself at fault point ``point``."""
    code = f"from ahamoment import atomic; atomic.write_text({str(path)!r}, {text!r})"
    env = {**os.environ, "AHAMOMENT_FAULT": f"{point}@1"}
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def test_a_write_killed_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic.write_text(path, '{"old": 1}')
    # the point sits after the new bytes are written to the temporary file, before the rename
    assert _killed_writing(path, '{"new": 2}', "write:summary.json") == -signal.SIGKILL
    assert path.read_text() == '{"old": 1}'
    atomic.write_text(path, '{"new": 2}')  # the next write replaces the leftover temporary
    assert path.read_text() == '{"new": 2}' and sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic.write_text(path, "old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(path, "new")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.json"]


def test_run_paths_write_atomically(tmp_path):
    # stages write `(run / "base_eval.json").write_text(...)`: that goes through atomic
    code = (
        f"from ahamoment.runs import RunDir; (RunDir({str(tmp_path)!r}) / 'base_eval.json')"
        ".write_text('{\"new\": 1}')"
    )
    (tmp_path / "base_eval.json").write_text('{"old": 1}')
    env = {**os.environ, "AHAMOMENT_FAULT": "write:base_eval.json@1"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "base_eval.json").read_text()) == {"old": 1}


@pytest.mark.parametrize(
    "content,kept",
    [
        (b"", b""),
        (b'{"a": 1}\n', b'{"a": 1}\n'),
        (b'{"a": 1}\n{"b": 2', b'{"a": 1}\n'),  # torn last line
        (b'{"b": 2', b""),  # a torn first line
        (b'{"a": 1}\n' * 5000 + b"x" * 70_000, b'{"a": 1}\n' * 5000),  # tail over 64 KiB
    ],
)
def test_cut_torn_tail(tmp_path, content, kept):
    path = tmp_path / "m.jsonl"
    path.write_bytes(content)
    atomic.cut_torn_tail(path)
    assert path.read_bytes() == kept


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    run.append("metrics.jsonl", {"step": 2})
    assert run.rows("metrics.jsonl") == [{"step": 1}, {"step": 2}]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_killed_append_is_torn_and_cut_by_the_next_one(tmp_path):
    code = (
        f"from ahamoment.runs import RunDir; r = RunDir({str(tmp_path)!r}); "
        "r.append('m.jsonl', {'step': 1}); r.append('m.jsonl', {'step': 2, 'pad': 'x' * 100})"
    )
    env = {**os.environ, "AHAMOMENT_FAULT": "runs.append@2:0.5"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL
    raw = (tmp_path / "m.jsonl").read_text()
    assert raw.startswith('{"step": 1}\n{"step": 2') and not raw.endswith("\n")  # torn
    RunDir(tmp_path).append("m.jsonl", {"step": 2})
    assert RunDir(tmp_path).rows("m.jsonl") == [{"step": 1}, {"step": 2}]


def test_checked_files_detect_a_flipped_byte(tmp_path):
    path = tmp_path / "resume.pt"
    atomic.write_checked(path, b"x" * 100)
    assert atomic.read_checked(path) == b"x" * 100
    data = bytearray(path.read_bytes())
    data[-50] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        atomic.read_checked(path)


# --- checkpoints ----------------------------------------------------------------------------
def _save(root, step, model, tok, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return checkpoint.save(root, step, model, tok, opt, sched, {}, **kw)


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer.pt", "state.json"])
def test_a_corrupt_newest_checkpoint_falls_back_with_one_warning(
    tiny_model, tiny_tokenizer, tmp_path, victim
):
    for step in (1, 2):
        _save(tmp_path, step, tiny_model, tiny_tokenizer)
    manifest = json.loads((tmp_path / "step-2" / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "trainer.pt", "state.json"} <= set(manifest)
    path = tmp_path / "step-2" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit of rot in the middle
    path.write_bytes(bytes(data))
    warnings: list[str] = []
    assert checkpoint.latest_valid(tmp_path, warnings.append) == tmp_path / "step-1"
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"({victim}: sha256 mismatch)" in warnings[0] and "resuming from step-1" in warnings[0]
    assert (tmp_path / "step-2.corrupt").is_dir()  # set aside, never listed again
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-1"]
    assert checkpoint.latest_valid(tmp_path, warnings.append) == tmp_path / "step-1"
    assert len(warnings) == 1


def test_a_checkpoint_with_a_missing_file_is_not_loaded(tiny_model, tiny_tokenizer, tmp_path):
    _save(tmp_path, 1, tiny_model, tiny_tokenizer)
    (tmp_path / "step-1" / "trainer.pt").unlink()
    warnings: list[str] = []
    assert checkpoint.latest_valid(tmp_path, warnings.append) is None
    assert "trainer.pt: missing" in warnings[0] and "from step 0" in warnings[0]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint.weights", "checkpoint.trainer", "checkpoint.sealed"])
def test_a_kill_inside_a_checkpoint_write_leaves_no_checkpoint(tmp_path, point):
    code = textwrap.dedent(f"""
        import torch
        from ahamoment import checkpoint
        from ahamoment.models import build_tokenizer, new_model, tiny_llama_config
        tok = build_tokenizer(["a b c d e f g"] * 20, vocab_size=40)
        model = new_model(tiny_llama_config(tok, 16, 1, 2, 32, 64), 0)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        for step in (1, 2):
            checkpoint.save({str(tmp_path)!r}, step, model, tok, opt, sched, {{}})
    """)
    env = {**os.environ, "AHAMOMENT_FAULT": f"{point}@2"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL
    assert (tmp_path / "step-2.tmp").is_dir()  # killed while writing step 2
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-1"]
    assert checkpoint.latest_valid(tmp_path) == tmp_path / "step-1"


def test_a_checkpoint_that_cannot_be_written_says_so_and_keeps_the_last(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    _save(tmp_path, 1, tiny_model, tiny_tokenizer)

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(atomic.WriteError) as e:
        _save(tmp_path, 2, tiny_model, tiny_tokenizer)
    msg = str(e.value)
    assert "\n" not in msg and f"cannot write checkpoint {tmp_path / 'step-2'}" in msg
    assert "No space left on device" in msg and "the last good checkpoint, step-1, is intact" in msg
    assert sorted(os.listdir(tmp_path)) == ["step-1"]  # the temporary is gone
    assert atomic.verify_manifest(tmp_path / "step-1") is None


# --- distill generate: a chunk a kill cut short -------------------------------------------------
class _Teacher(LocalTeacher):
    """A local teacher whose samples depend on the seed and on each prompt's place in the
    call, as a batched sampler's do: asking only the rest of a chunk would change them."""

    def __init__(self, calls: list) -> None:
        self.name, self.calls = "local:fake", calls

    def sample(self, questions, n, seed):
        self.calls.append((len(questions), seed))
        out = []
        for i, q in enumerate(questions):
            expr, steps = _solve(q)
            out.append(
                TeacherResult([teacher_sample(f"{steps} s{seed}i{i}", f"<answer>{expr}</answer>")])
            )
        return out


def test_a_resumed_chunk_draws_what_the_uninterrupted_run_drew(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(distill, "make_teacher", lambda cfg: _Teacher(calls))
    cfg = dict(teacher="x", n_prompts=8, samples=1, chunk=4, threads=1)
    straight = tmp_path / "straight"
    distill_generate(DistillGenerateConfig(**cfg, out=str(straight)))
    assert calls == [(4, 0), (4, 4)]
    # a kill after the third prompt's marker: the chunk 0..3 is asked again whole, same seed
    cut = tmp_path / "cut"
    cut.mkdir()
    rows = (straight / "traces-00000.jsonl").read_text().splitlines(keepends=True)
    done = (straight / "done.jsonl").read_text().splitlines(keepends=True)
    (cut / "traces-00000.jsonl").write_text("".join(rows[:3]))
    (cut / "done.jsonl").write_text("".join(done[:3]))
    calls.clear()
    distill_generate(DistillGenerateConfig(**cfg, out=str(cut)))
    assert calls == [(4, 0), (4, 4)]
    for name in ("traces-00000.jsonl", "done.jsonl"):
        assert (cut / name).read_text() == (straight / name).read_text()


# --- disk full, read-only ---------------------------------------------------------------------
def _can_mount() -> str:
    """'' when this process may mount a tmpfs in a new mount namespace; else why not."""
    if not shutil.which("unshare") or sys.platform != "linux":
        return "needs Linux and unshare(1)"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
        capture_output=True,
    )
    return "" if probe.returncode == 0 else "cannot mount in a new mount namespace (not root?)"


needs_mount = pytest.mark.skipif(bool(_can_mount()), reason=_can_mount() or "-")


def _in_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``script`` (sh) in a private mount namespace: its mounts vanish with it."""
    env = {**os.environ, "AHAMOMENT_CACHE": str(tmp_path / "cache"), "COLUMNS": "300"}
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)  # fmt: skip


def _one_error_line(log: str) -> str:
    assert "Traceback" not in log, log[-3000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, log[-3000:]
    return errors[0]


@pytest.mark.slow
@needs_mount
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_base, tmp_path):
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    py = f"{sys.executable} -m ahamoment.cli"
    args = f"zero --model {tiny_base} {' '.join(ZERO_TINY)} --steps 6 --keep-checkpoints 0"
    # ~140 KB per checkpoint: a 360 KB disk holds two of them, not three
    script = f"""
        mount -t tmpfs -o size=360k tmpfs {disk}
        {py} {args} --out {disk}/run > {tmp_path}/full.log 2>&1 || echo $? > {tmp_path}/rc
        cp -a {disk}/run {saved}
        mount -o remount,size=64m {disk}
        {py} {args} --out {disk}/run --resume > {tmp_path}/resumed.log 2>&1
        cp -a {disk}/run {saved}-resumed
    """
    res = _in_namespace(script, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "rc").read_text().strip() == "1"
    line = _one_error_line((tmp_path / "full.log").read_text())
    assert "No space left on device" in line, line
    steps = checkpoint.list_checkpoints(saved / "checkpoints")
    assert steps and not list((saved / "checkpoints").glob("*.tmp"))  # nothing half written
    assert all(atomic.verify_manifest(p) is None for p in steps)
    last = steps[-1].name.split("-")[1]
    resumed = (tmp_path / "resumed.log").read_text()
    assert f"from step {last}" in resumed and (saved.parent / "saved-resumed" / "final").is_dir()


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
@needs_mount
def test_a_read_only_run_directory_stops_with_one_line_and_changes_nothing(tiny_base, tmp_path):
    run = tmp_path / "run"
    aha("zero", "--model", str(tiny_base), *ZERO_TINY, "--steps", "2", "--out", str(run))
    before = _tree(run)
    py = f"{sys.executable} -m ahamoment.cli"
    script = f"""
        mount --bind {run} {run}
        mount -o remount,bind,ro {run}
        {py} zero --model {tiny_base} {" ".join(ZERO_TINY)} --out {run} --resume \
            > {tmp_path}/zero.log 2>&1 || echo $? > {tmp_path}/zero.rc
        {py} eval --model {tiny_base} --n 4 --k 2 --max-new-tokens 8 --threads 1 --out {run} \
            > {tmp_path}/eval.log 2>&1 || echo $? > {tmp_path}/eval.rc
    """
    res = _in_namespace(script, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("zero", "eval"):
        assert (tmp_path / f"{name}.rc").read_text().strip() == "1"
        line = _one_error_line((tmp_path / f"{name}.log").read_text())
        assert "Read-only file system" in line, line
    assert _tree(run) == before


def test_a_signal_inside_interrupts_deferred_lands_when_the_block_ends():
    # zero's update-and-count and log-and-mark blocks: the block runs to its end, then the
    # Ctrl-C (or kill) is raised; a second signal inside the block raises at once
    from ahamoment import runs
    from ahamoment.runs import interrupts_deferred

    done = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    term = signal.signal(signal.SIGTERM, runs.raise_interrupt)  # as interruptible sets it
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("after the signal")
        assert done == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        assert signal.getsignal(signal.SIGTERM) is runs.raise_interrupt

        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                done.append("not reached")
        assert done == ["after the signal"]

        with interrupts_deferred():  # no signal: nothing raised
            done.append("quiet")
        assert done[-1] == "quiet"

        # an ignored Ctrl-C (a job started in the background) stays ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("ignored")
        assert done[-1] == "ignored" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGTERM, term)
