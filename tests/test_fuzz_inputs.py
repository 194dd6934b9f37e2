"""Bad input, fuzzed (hypothesis, fixed seed, bounded examples): every loader and the CLI answer
a malformed file, a missing or mistyped field, an empty or binary file, a huge line, an unknown
recipe key or an out-of-range value with one line naming the file, the line and the field,
a non-zero exit, no traceback, and nothing written to the run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ahamoment import cli, data
from ahamoment import config as cfglib
from ahamoment.data import DataError
from ahamoment.stages.distill import DistillGenerateConfig
from ahamoment.stages.eval import EvalConfig
from ahamoment.stages.pretrain import PretrainConfig
from ahamoment.stages.r1 import R1Config
from ahamoment.stages.serve import ServeConfig
from ahamoment.stages.sft import SFTConfig, read_rows
from ahamoment.stages.zero import ZeroConfig
from ahamoment.tasks import get_task
from ahamoment.tasks.countdown import MAX_LITERAL
from ahamoment.tasks.math import load_problem_jsonl
from ahamoment.traces import TraceStore
from test_zero_e2e import ROOT

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # a fixed seed: the same examples on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- lines: each one valid (for its loader) or certainly not ----------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=6,
)
wrong = json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
garbage = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: _not_json_object(b)),
    st.text(min_size=1, max_size=40).map(str.encode).filter(lambda b: _not_json_object(b)),
    st.just(b"[" * 5000 + b"]" * 5000),  # deep nesting
    st.just(b'{"target": 1' + b"0" * 5000 + b"}"),  # a 5,000-digit number
    st.just(b"\xff\xfe\x00\x01 binary"),
    st.just(b'{"a": NaN, "b": "\xe9"}'),
)


def _not_json_object(raw: bytes) -> bool:
    if not raw.strip() or b"\n" in raw:
        return False  # a blank line is skipped, not an error; a newline makes two lines
    try:
        return not isinstance(json.loads(raw.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return True


def _line(row: dict) -> bytes:
    return json.dumps(row).encode()


def countdown_lines(valid: bool):
    if valid:
        nums = st.lists(st.integers(0, 100), min_size=2, max_size=5)
        return st.builds(lambda n, t, i: _line({"nums": n, "target": t, "id": f"p{i}"}),
                         nums, st.integers(-50, 500), st.integers())  # fmt: skip
    good_nums = lambda v: (  # noqa: E731
        isinstance(v, list)
        and len(v) >= 2
        and all(type(x) is int and 0 <= x <= MAX_LITERAL for x in v)
    )
    rows = st.one_of(
        st.builds(
            lambda v: _line({"nums": v, "target": 3}),
            json_values.filter(lambda v: not good_nums(v)),
        ),
        st.builds(lambda v: _line({"nums": [1, 2], "target": v}), wrong),
        st.builds(
            lambda v: _line({"nums": [1, 2], "target": 3, "id": v}),
            json_values.filter(lambda v: isinstance(v, list | dict | float | bool) or v is None),
        ),  # fmt: skip
        st.just(_line({"target": 3})),
        st.just(_line({"nums": [1, 2]})),
    )
    return rows | garbage


def math_lines(valid: bool):
    if valid:
        return st.builds(lambda q, a: _line({"problem": q, "answer": a}),
                         st.text(min_size=1, max_size=20).filter(str.strip),
                         st.integers() | st.text(alphabet="0123456789", min_size=1, max_size=5))  # fmt: skip
    rows = st.one_of(
        st.builds(
            lambda v: _line({"problem": v, "answer": "1"}),
            json_values.filter(lambda v: not (isinstance(v, str) and v.strip())),
        ),  # fmt: skip
        st.builds(
            lambda v: _line({"problem": "q", "answer": v}),
            st.none() | st.booleans() | st.lists(st.integers(), max_size=2) | st.just("  "),
        ),  # fmt: skip
    )
    return rows | garbage


def sft_lines(valid: bool):
    turn = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=8)}
    )
    if valid:
        last = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(max_size=8)})
        return st.one_of(
            st.builds(lambda p, c: _line({"prompt": p, "completion": c}), st.text(max_size=8), st.text(max_size=8)),
            st.builds(lambda t, a: _line({"messages": [*t, a]}), st.lists(turn, min_size=1, max_size=2), last),
        )  # fmt: skip
    rows = st.one_of(
        st.builds(lambda v: _line({"prompt": v, "completion": "c"}), wrong.filter(lambda v: not isinstance(v, str))),
        st.builds(lambda v: _line({"prompt": "p", "completion": v}), wrong.filter(lambda v: not isinstance(v, str))),
        st.builds(lambda v: _line({"messages": v}), json_values),
        st.builds(lambda t: _line({"messages": t}), st.lists(turn, max_size=3)),  # no assistant turn last
        st.builds(lambda v: _line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": v}]}),
                  wrong.filter(lambda v: not isinstance(v, str))),
    )  # fmt: skip
    return rows | garbage


def files(kind):
    """(lines, index of the first bad one or None)."""

    @st.composite
    def build(draw):
        good = draw(st.lists(kind(True), max_size=4))
        if draw(st.booleans()):
            return good, None
        bad = draw(kind(False))
        rest = draw(st.lists(kind(True) | kind(False), max_size=2))
        return [*good, bad, *rest], len(good)

    return build()


def _write(tmp_path: Path, lines: list[bytes], name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _check_error(e: Exception, path: Path, lineno: int, fields: tuple[str, ...]) -> None:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 400, msg
    assert msg.startswith(f"{path}:{lineno}: "), msg
    if "JSON" not in msg and "UTF-8" not in msg and "longer than" not in msg:
        assert any(f"'{f}'" in msg for f in fields), msg  # a field error names the field


@seed(0)
@FUZZ
@given(st.data())
def test_task_loaders(tmp_path, data):
    for load, kind, fields in [
        (get_task("countdown").load_jsonl, countdown_lines, ("nums", "target", "id")),
        (load_problem_jsonl, math_lines, ("problem", "answer", "id")),
        (get_task("arithmetic").load_jsonl, math_lines, ("problem", "answer", "id")),
    ]:
        lines, bad = data.draw(files(kind))
        path = _write(tmp_path, lines)
        if bad is None:
            assert len(load(str(path))) == len(lines)
            continue
        with pytest.raises(DataError) as e:
            load(str(path))
        _check_error(e.value, path, bad + 1, fields)


@seed(0)
@FUZZ
@given(files(sft_lines))
def test_chat_and_pair_loader(tmp_path, case):
    lines, bad = case
    path = _write(tmp_path, lines)
    if bad is None and lines:
        assert len(read_rows([path])) == len(lines)
        return
    with pytest.raises(DataError) as e:
        read_rows([path])
    if bad is None:  # an empty file
        assert str(e.value) == f"{path}: no rows"
    else:
        _check_error(e.value, path, bad + 1, ("prompt", "completion", "messages"))


def test_a_huge_line_is_an_error_not_a_memory_blow_up(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    path = _write(
        tmp_path, [_line({"nums": [1, 2], "target": 3}), b'{"nums": [' + b"1," * 2000 + b"1]}"]
    )
    with pytest.raises(DataError, match=r"in.jsonl:2: line longer than 0 MiB"):
        get_task("countdown").load_jsonl(str(path))
    assert list(data.read_jsonl(path, tolerant=True)) == [(1, {"nums": [1, 2], "target": 3})]


# --- trace stores -------------------------------------------------------------------------------
def _marker(pid: str) -> bytes:
    return _line({"prompt_id": pid, "accepted": 1, "rejected": {}, "attempts": 1})


def _trace(pid: str) -> bytes:
    return _line({"prompt": "p", "completion": "c", "meta": {"prompt_id": pid}})


@seed(0)
@FUZZ
@given(
    st.lists(st.sampled_from(["a", "b", "c"]).map(_marker) | garbage | st.builds(_line, st.dictionaries(st.text(max_size=4), json_values, max_size=3)), max_size=4),
    st.lists(st.sampled_from(["a", "b", "z"]).map(_trace) | garbage, max_size=4),
    st.binary(max_size=20),
)  # fmt: skip
def test_trace_stores(tmp_path, done, shard, tail):
    out = tmp_path / "traces"
    out.mkdir(exist_ok=True)
    # a torn tail (no newline at the end) is a kill mid-write: cut, never an error
    (out / "done.jsonl").write_bytes(b"".join(x + b"\n" for x in done) + tail.replace(b"\n", b""))
    (out / "traces-00000.jsonl").write_bytes(b"".join(x + b"\n" for x in shard))
    try:
        store = TraceStore(out)
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(str(out)), msg
        assert ".jsonl:" in msg.split(": ")[0], msg
        return
    kept = [
        json.loads(x)["meta"]["prompt_id"]
        for x in (out / "traces-00000.jsonl").read_bytes().splitlines()
    ]
    assert set(kept) <= set(store.done)  # rows of prompts without a marker were dropped


# --- recipes and flags ------------------------------------------------------------------------
CONFIGS = [
    ZeroConfig,
    SFTConfig,
    EvalConfig,
    PretrainConfig,
    DistillGenerateConfig,
    R1Config,
    ServeConfig,
]
NUMERIC = {
    cls: [f.name for f in cfglib.dataclasses.fields(cls) if cfglib._field_type(cls, f) in (int, float, bool)]
    for cls in CONFIGS
}  # fmt: skip
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(),
    st.text(max_size=10), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@st.composite
def recipes(draw):
    cls = draw(st.sampled_from(CONFIGS))
    names = {f.name for f in cfglib.dataclasses.fields(cls)}
    typos = st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=12).filter(
        lambda k: k.replace("-", "_") not in names  # string fields (task, model, ...) stay default
    )
    keys = st.sampled_from(NUMERIC[cls]) | typos
    body = draw(st.dictionaries(keys, scalars, max_size=4))
    text = yaml.safe_dump(body, allow_unicode=True)
    if draw(st.integers(0, 9)) == 0:  # now and then not YAML at all
        text = draw(st.text(max_size=30))
    return cls, text


def _required(cls) -> dict:
    return (
        {"data": "x.jsonl"}
        if cls is SFTConfig
        else {"teacher": "t", "out": "o"}
        if cls is DistillGenerateConfig
        else {}
    )


@seed(0)
@FUZZ
@given(recipes())
def test_recipes(tmp_path, case):
    cls, text = case
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    try:
        cfglib.build(cls, path, **_required(cls))
    except cfglib.ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 600, msg
        assert msg.startswith((str(path), "command line", cls.__name__)), msg
        if "unknown field" in msg:
            assert msg.startswith(f"{path}:"), msg  # the line of the key


@seed(0)
@FUZZ
@given(st.data())
def test_flag_values(data):
    cls = data.draw(st.sampled_from(CONFIGS))
    name = data.draw(st.sampled_from(NUMERIC[cls]))
    value = data.draw(
        st.text(max_size=12)
        | st.integers().map(str)
        | st.sampled_from(["nan", "inf", "-0", "1e400", "0x10", "true"])
    )
    try:
        cfglib.build(cls, None, **{**_required(cls), name: value})
    except cfglib.ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(("command line: field '", cls.__name__)), msg  # fmt: skip


@pytest.mark.parametrize(
    "args,where",
    [
        (["zero", "--steps", "0"], "command line: field 'steps': steps must be at least 1"),
        (["zero", "--group-size", "1"], "command line: field 'group_size'"),
        (["zero", "--temperature", "-0.5"], "command line: field 'temperature'"),
        (["zero", "--top-p", "0"], "command line: field 'top_p'"),
        (["zero", "--top-p", "1.5"], "command line: field 'top_p'"),
        (["eval", "--temperature", "-1"], "command line: field 'temperature'"),
        (["eval", "--top-p", "2"], "command line: field 'top_p'"),
        (["distill", "generate", "--teacher", "t", "--top-p", "0", "--out", "o"], "field 'top_p'"),
        (["distill", "generate", "--teacher", "t", "--temperature", "-1", "--out", "o"], "field 'temperature'"),
        (["r1", "--rl-steps", "0"], "command line: field 'rl_steps'"),
        (["pretrain", "--tokens", "nan"], "command line: field 'tokens'"),
        (["sft", "--data", "x", "--epochs", "[1]"], "command line: field 'epochs'"),
        (["zero", "--stpes", "3"], "did you mean --steps?"),
    ],
)  # fmt: skip
def test_out_of_range_flags_through_the_cli(args, where, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], out
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_recipe_key_names_the_line_and_suggests(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 3\ngroup-sise: 4\n")
    assert cli.main(["zero", "--recipe", str(recipe)]) == 2
    line = capsys.readouterr().out.strip()
    assert (
        line
        == f"error: {recipe}:2: unknown field 'group_sise' for ZeroConfig; did you mean 'group_size'?"
    )


# --- data files through the CLI: one line, status 2, nothing in the run directory ---------------
BAD_FILES = {
    "empty": b"",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
    "malformed": b'{"nums": [1, 2], "target": 3}\n{"nums": [1,\n',
    "mistyped": b'{"nums": [1, 2], "target": 3}\n{"nums": "1 2", "target": 3}\n',
    "missing": b'{"nums": [1, 2], "target": 3}\n\n{"nums": [1, 2]}\n',
    "not an object": b"[1, 2, 3]\n",
}


@pytest.mark.parametrize("stage", ["eval", "sft", "distill"])
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_files_through_the_cli(stage, name, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_FILES[name])
    out = tmp_path / "run"
    args = {
        "eval": ["eval", "--data", str(path), "--model", "m", "--out", str(out)],
        "sft": ["sft", "--data", str(path), "--model", "m", "--out", str(out)],
        "distill": ["distill", "generate", "--prompts", str(path), "--teacher", "t", "--out", str(out)],
    }[stage]  # fmt: skip
    assert cli.main(args) == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), lines
    if name in ("malformed", "mistyped", "missing") and stage != "sft":
        line = {"malformed": 2, "mistyped": 2, "missing": 3}[name]
        assert lines[0].startswith(f"error: {path}:{line}: "), lines
    assert not out.exists()  # validated before anything is written


@pytest.mark.slow
def test_bad_input_through_the_real_aha_script(tmp_path):
    """The installed entry point: status 2, one line on stdout, no traceback anywhere."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "p", "completion": "c"}\n{"prompt": 3}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xff\xfe binary")
    for args, want in [
        (["sft", "--data", str(bad), "--out", str(tmp_path / "o")], f"error: {bad}:2: expected string fields"),
        (["zero", "--recipe", str(recipe)], f"error: {recipe}: not a YAML recipe"),
        (["zero", "--group-size", "1"], "error: command line: field 'group_size'"),
    ]:  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "ahamoment.cli", *args], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr, res.stderr
        assert res.stdout.strip().startswith(want) and len(res.stdout.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
