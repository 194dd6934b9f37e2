"""The code sandbox: a hostile-program suite, then table tests of its parts.

Every hostile program (tests/sandbox_programs/) is a candidate answer to "write add(a, b)".
Most of them answer correctly *only if their attack worked*: the memory bomb returns a + b
once it holds 2 GiB, the file reader once it read the expected values. So "reward 0" checks
the defence, not just a wrong answer. After each run the suite checks that the call took at
most timeout + 2 s, that no process of the program is left, that a world-writable sentinel
outside the sandbox is untouched, and that no connection or listening socket got out.

Limits are kept small so that a defence that fails cannot take the shared machine down: 256
MiB of address space, 8 processes, a 16 MiB disk, a 1 s timeout. The real fork bomb runs only
after a bounded one has shown that the process limit holds.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ahamoment.sandbox import (
    STATUSES,
    Limits,
    NotGradable,
    Result,
    TestCase,
    harness,
    isolation,
    load_tests,
    parse_assert,
    run_many,
    run_tests,
    same,
)
from ahamoment.sandbox._runner import encode
from ahamoment.sandbox.values import BadValue, check_expected, decode

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

PROGRAMS = Path(__file__).with_name("sandbox_programs")
HONEST = "def add(a, b):\n    return a + b\n"
TESTS = [
    TestCase(call="add(2, 3)", expected=5),
    TestCase(call="add(-1, 1)", expected=0),
    TestCase(call="add(10, 32)", expected=42),
    TestCase(call="add(0.5, 0.25)", expected=0.75),
]
TIMEOUT = 1.0
LIMITS = Limits(memory_mb=256, processes=8, disk_mb=16, file_mb=4, output_bytes=16384)

# program -> the statuses it may end with (all of them score 0), and the isolation it needs
# (without it the attack works, as docs/sandbox.md says: the test is skipped, not passed).
HOSTILE: dict[str, tuple[set[str], str]] = {
    "loop_at_load": ({"timeout"}, ""),
    "loop_in_call": ({"timeout"}, ""),
    "ignore_sigterm": ({"timeout"}, ""),
    "memory_bomb": ({"memory"}, ""),
    "disk_bomb": ({"failed"}, "fs_jail"),  # the jail's tmpfs bounds all files together
    "sys_exit_at_load": ({"exited"}, ""),
    "sys_exit_in_call": ({"exited"}, ""),
    "os_exit": ({"exited"}, ""),
    "atexit_forge": ({"exited"}, ""),
    "always_equal": ({"bad_result"}, ""),
    "int_subclass": ({"failed"}, ""),  # it arrives as the plain -999 it holds
    "patch_builtins": ({"failed"}, ""),
    "wrong_types": ({"failed"}, ""),
    "takeover_channel": ({"failed", "protocol_error"}, ""),
    "forge_frames_thread": ({"protocol_error", "failed"}, ""),
    "close_fds": ({"exited"}, ""),
    "dup_over_fds": ({"exited"}, ""),
    "search_memory": ({"failed"}, ""),
    "snoop_processes": ({"failed"}, ""),
    "net_connect": ({"failed"}, "net"),
    "net_bind": ({"failed"}, ""),
    "write_outside": ({"failed"}, "fs_jail"),
    "delete_outside": ({"failed"}, "fs_jail"),
    "escape_jail": ({"failed"}, "fs_jail"),
    "kill_parent": ({"failed"}, "pid_ns"),
    "daemon_children": ({"failed"}, ""),
    "segfault": ({"crash"}, ""),
    "recursion_bomb": ({"crash", "failed", "memory"}, ""),
    "huge_output": ({"output_limit"}, ""),
    "huge_result": ({"bad_result"}, ""),
    "self_reference": ({"bad_result"}, ""),
}
# these need a test file on disk, or look at what the CLI prints: run through the real CLI
HOSTILE_CLI: dict[str, tuple[set[str], str]] = {
    "read_test_file": ({"failed"}, "fs_jail"),
    "search_tmp": ({"failed"}, "fs_jail"),
    "spoof_stdout": ({"exited"}, ""),
}


def _has(need: str) -> bool:
    iso = isolation()
    if need == "net":
        return iso.get("net") in ("netns", "seccomp")
    if need == "pid_ns":  # kill(-1) and /proc scans reach only the program's own processes
        return bool(iso.get("pid_ns")) or iso.get("uid") == "random"
    return bool(iso.get(need)) if need else True


@dataclass
class World:
    """What a program must not touch: a world-writable sentinel, a listener, a free port."""

    dir: Path
    sentinel: Path
    listener: socket.socket
    bind_port: int
    mark: str
    made: list[str]

    def program(self, name: str) -> str:
        text = (PROGRAMS / f"{name}.py").read_text()
        for key, value in {
            "__SENTINEL__": self.sentinel,
            "__OUTSIDE__": self.dir / "pwned.txt",
            "__TESTS_FILE__": self.dir / "tests.jsonl",
            "__PORT__": self.listener.getsockname()[1],
            "__BIND_PORT__": self.bind_port,
            "__MARK__": self.mark,
        }.items():
            text = text.replace(key, str(value))
        return text

    def assert_clean(self) -> None:
        assert self.sentinel.read_text() == "untouched\n"
        assert sorted(p.name for p in self.dir.iterdir()) in (
            ["sentinel.txt"],
            ["sentinel.txt", "tests.jsonl"],
        )
        assert not os.path.exists("/tmp/ahamoment-pwned")
        with pytest.raises(BlockingIOError):  # nobody connected to the host's listener
            self.listener.accept()
        assert self.bind_port not in _listening_ports()
        assert _survivors(self.mark) == []
        assert [d for d in self.made if os.path.exists(d)] == []  # temp dirs deleted


@pytest.fixture
def world(monkeypatch):
    d = Path(tempfile.mkdtemp(prefix="ahamoment-sentinel-"))
    d.chmod(0o777)  # so only the jail, not file permissions, protects it
    sentinel = d / "sentinel.txt"
    sentinel.write_text("untouched\n")
    sentinel.chmod(0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    bind_port = probe.getsockname()[1]
    probe.close()
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        made.append(path)
        return path

    monkeypatch.setattr(harness.tempfile, "mkdtemp", recording_mkdtemp)
    mark = f"31.{random.randrange(10**4, 10**5)}"
    yield World(d, sentinel, listener, bind_port, mark, made)
    listener.close()
    shutil.rmtree(d, ignore_errors=True)


def _listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _survivors(mark: str) -> list[str]:
    """Processes left by a run: any descendant of our zygote, or any process that carries the
    program's mark (an exec'd ``sleep MARK``, or a renamed daemon)."""
    zygote = harness._ZYGOTE.proc.pid if harness._ZYGOTE.proc else -1
    parent: dict[int, int] = {}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            comm = Path(f"/proc/{name}/comm").read_bytes()
        except OSError:
            continue
        parent[int(name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if mark.encode() in cmdline or mark.encode()[-5:] in comm:
            found.append(f"{name}: {cmdline!r}")
    for pid in parent:
        p = parent.get(pid, 0)
        while p > 1 and p != zygote:
            p = parent.get(p, 0)
        if p == zygote and pid != zygote:
            found.append(f"{pid}: a descendant of the zygote")
    return found


def _score(world: World, name: str) -> Result:
    t0 = time.monotonic()
    r = run_tests(world.program(name), TESTS, timeout=TIMEOUT, limits=LIMITS)
    elapsed = time.monotonic() - t0
    assert elapsed <= TIMEOUT + 2, f"{name} took {elapsed:.1f} s"
    assert r.status in STATUSES
    return r


# --- the hostile suite ---------------------------------------------------------------------


def test_honest_add_scores_1(world):
    r = run_tests(HONEST, TESTS, timeout=TIMEOUT, limits=LIMITS)
    assert (r.passed, r.total, r.status, r.reward()) == (4, 4, "passed", 1.0)
    world.assert_clean()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_0(world, name):
    statuses, need = HOSTILE[name]
    if not _has(need):
        pytest.skip(f"this kernel gives the sandbox no {need} (docs/sandbox.md)")
    r = _score(world, name)
    assert r.reward() == 0.0, r
    assert r.status in statuses, r
    world.assert_clean()
    assert harness._ZYGOTE.proc.poll() is None  # kill_parent: the harness side survived


def test_fork_bomb_is_bounded_then_a_real_one_is_too(world):
    r = _score(world, "fork_bomb_bounded")  # answers right iff 32 of its 64 forks worked
    assert (r.reward(), r.status) == (0.0, "failed"), r
    world.assert_clean()
    r = _score(world, "fork_bomb")
    assert (r.reward(), r.status) == (0.0, "timeout"), r
    world.assert_clean()


@pytest.mark.parametrize("name", sorted(HOSTILE_CLI))
def test_hostile_program_via_the_cli(world, name):
    statuses, need = HOSTILE_CLI[name]
    if not _has(need):
        pytest.skip(f"this kernel gives the sandbox no {need} (docs/sandbox.md)")
    tests_file = world.dir / "tests.jsonl"  # world-readable, beside the program's cwd
    tests_file.write_text(
        "".join(json.dumps({"call": t.call, "expected": t.expected}) + "\n" for t in TESTS)
    )
    tests_file.chmod(0o644)
    program = world.dir.parent / f"{world.dir.name}-program.py"
    program.write_text(world.program(name))
    try:
        t0 = time.monotonic()
        proc = _cli("--code", program, "--tests", tests_file, "--timeout", TIMEOUT)
        assert time.monotonic() - t0 <= TIMEOUT + 2 + 3  # + the CLI's own start-up
    finally:
        program.unlink()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[:500]  # the spoofed lines never reach our stdout
    line = json.loads(lines[0])
    assert line["reward"] == 0.0 and line["status"] in statuses, line
    world.assert_clean()


def _cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ahamoment.sandbox", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


# --- the fallbacks, forced on a kernel that has the real thing ------------------------------

FALLBACK_DAEMON = """
import ctypes, os, time
for kind in ("exec", "python"):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            if kind == "exec":
                os.execv("/bin/sleep", ["sleep", "MARK"])
            ctypes.CDLL(None).prctl(15, b"ahm" + b"MARK"[-5:], 0, 0, 0)  # PR_SET_NAME
            time.sleep(600)
        os._exit(0)
def add(a, b):
    return -999
"""


def _fallback(code: str, force: str = "rlimits") -> Result:
    t0 = time.monotonic()
    r = harness._force_run(code, TESTS, timeout=TIMEOUT, limits=LIMITS, force=force)
    assert time.monotonic() - t0 <= TIMEOUT + 2
    assert r.isolation["pid_ns"] is False and r.isolation["fs_jail"] is False
    return r


def test_fallback_without_namespaces_still_scores_and_bounds(world):
    assert _fallback(HONEST).status == "passed"
    r = _fallback(world.program("fork_bomb_bounded"))
    assert (r.reward(), r.status) == (0.0, "failed"), r
    r = _fallback(FALLBACK_DAEMON.replace("MARK", world.mark))  # the outer is a subreaper
    assert (r.reward(), r.status) == (0.0, "failed"), r
    world.assert_clean()


def test_fallback_seccomp_blocks_sockets(world):
    r = _fallback(world.program("net_connect"))
    if not r.isolation["seccomp"]:
        pytest.skip("no seccomp on this architecture")
    assert r.isolation["net"] == "seccomp"
    assert (r.reward(), r.status) == (0.0, "failed"), r
    world.assert_clean()


def test_fallback_without_seccomp_blocks_socket_imports():
    code = "import sys\ndef blocked():\n    return sys.modules.get('_socket', 1) is None\n"
    r = harness._force_run(
        code,
        [TestCase(call="blocked()", expected=True)],
        timeout=TIMEOUT,
        limits=LIMITS,
        force="rlimits-noseccomp",
    )
    assert (r.status, r.isolation["net"], r.isolation["seccomp"]) == (
        "passed",
        "import-block",
        False,
    )


# --- what an honest program sees -------------------------------------------------------------


def _facts(*calls_and_expected: tuple[str, object], code: str = "import os, sys\n") -> Result:
    tests = [TestCase(call=c, expected=e) for c, e in calls_and_expected]
    return run_tests(code, tests, timeout=TIMEOUT + 1, limits=LIMITS)


def test_the_environment_is_scrubbed_and_the_home_is_the_cwd():
    r = _facts(
        ("sorted(os.environ)", ["HOME", "LANG", "PATH", "PWD", "TMPDIR"]),
        ("os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']", True),
        ("sys.argv", ["candidate"]),
        ("__name__", "candidate"),
    )
    assert r.status == "passed", r


def test_the_program_runs_unprivileged_in_its_own_namespaces():
    iso = isolation()
    if not (iso.get("pid_ns") and iso.get("fs_jail")):
        pytest.skip("this kernel gives no pid namespace or jail (docs/sandbox.md)")
    r = _facts(
        ("os.getpid()", 1),  # pid 1 of a fresh pid namespace
        (
            "sorted(os.listdir('/proc'))[0].isdigit() and len([p for p in os.listdir('/proc') if p.isdigit()])",
            1,
        ),
        ("os.path.exists(" + repr(str(Path(__file__))) + ")", False),  # the repo is not there
        (
            "os.getuid() != 0 and open('/proc/self/status').read().count('CapEff:\\t0000000000000000')",
            1,
        ),
        ("os.access('/usr', os.W_OK)", False),
    )
    assert r.status == "passed", r


def test_a_program_can_use_the_stdlib_and_its_own_temp_files():
    if not isolation().get("stdlib", True):
        pytest.skip("the stdlib is not readable by the sandbox's uid here (docs/sandbox.md)")
    code = (
        "import collections, hashlib, heapq, itertools, json, math, re, tempfile\n"
        "def work():\n"
        "    with tempfile.NamedTemporaryFile('w', delete=False) as f:\n"
        "        f.write('abc')\n"
        "    return [math.gcd(12, 18), hashlib.sha1(b'x').hexdigest()[:4], open(f.name).read()]\n"
    )
    r = run_tests(
        code, [TestCase(call="work()", expected=[6, "11f6", "abc"])], timeout=3, limits=LIMITS
    )
    assert r.status == "passed", r


# --- statuses, rewards, the pool --------------------------------------------------------------


def test_each_status_and_its_reward():
    cases = [
        ("def add(a, b):\n    return 5\n", "failed", 0.25),  # partial credit: 1 of 4
        ("def add(a, b)\n", "syntax_error", 0.0),
        ("raise ValueError('no')\n", "load_error", 0.0),
        ("def add(a, b):\n    return a / 0\n", "failed", 0.0),  # a call that raises fails
        ("def add(a, b):\n    return a + b + 0j\n", "bad_result", 0.0),
    ]
    for code, status, reward in cases:
        r = run_tests(code, TESTS, timeout=TIMEOUT, limits=LIMITS)
        assert (r.status, r.reward()) == (status, reward), (code, r)
    r = run_tests(HONEST, [], timeout=TIMEOUT)
    assert (r.status, r.reward()) == ("not_gradable", 0.0)
    assert Result(passed=3, total=4, status="failed").reward(partial=False) == 0.0
    assert Result(passed=4, total=4, status="crash").reward() == 0.0


def test_run_many_keeps_the_job_order():
    codes = [
        HONEST,
        "def add(a, b):\n    return 5\n",
        "x = (",
        HONEST,
        "import os\nos._exit(1)\n",
    ] * 3
    results = run_many([(c, TESTS) for c in codes], timeout=TIMEOUT, limits=LIMITS, workers=2)
    expected = ["passed", "failed", "syntax_error", "passed", "exited"] * 3
    assert [r.status for r in results] == expected


def test_the_zygote_comes_back_after_it_dies():
    run_tests(HONEST, TESTS, timeout=TIMEOUT)
    harness._ZYGOTE.proc.kill()
    harness._ZYGOTE.proc.wait()
    assert run_tests(HONEST, TESTS, timeout=TIMEOUT).status == "passed"


def test_limits_are_checked():
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=16)
    with pytest.raises(ValueError, match="processes"):
        Limits(processes=0)
    with pytest.raises(ValueError, match="timeout"):
        run_tests(HONEST, TESTS, timeout=0)


# --- parse_assert -------------------------------------------------------------------------------

GRADABLE = [
    ("assert add(2, 3) == 5", "add(2, 3)", 5),
    ("assert add(2,3)==5  # spacing and a comment", "add(2, 3)", 5),
    ("assert 5 == add(2, 3)", "add(2, 3)", 5),  # the literal may come first
    ("assert f(1) == 2, 'a message is ignored'", "f(1)", 2),
    ("assert f(x) == (1, 2)", "f(x)", (1, 2)),
    ("assert f() == [1, 'a', None, {'k': 2.5}]", "f()", [1, "a", None, {"k": 2.5}]),
    ("assert f() == -3", "f()", -3),
    ("assert set(f((3, 4), (4, 5))) == set((4, 5))", "set(f((3, 4), (4, 5)))", {4, 5}),
    ("assert f() == frozenset()", "f()", frozenset()),
    ("assert f() == float('inf')", "f()", math.inf),
    ("assert f() is True", "f()", True),
    ("assert f() is None", "f()", None),
    ("assert (f(1) == b'x')", "f(1)", b"x"),
]


@pytest.mark.parametrize(("line", "call", "expected"), GRADABLE)
def test_parse_assert_reads(line, call, expected):
    t = parse_assert(line)
    assert (t.call, t.expected) == (call, expected)
    assert type(t.expected) is type(expected)


NOT_GRADABLE = [
    "assert f(1) < 2",
    "assert abs(f(1) - 0.5) < 1e-6",
    "assert math.isclose(f(1), 0.5)",
    "assert f(1)",
    "assert not f(1)",
    "assert f(1) == g(2)",  # neither side is a literal
    "assert 1 == 1",  # neither side calls the program
    "assert f(1) == 2 == g(3)",
    "assert f(1) != 2",
    "assert f() is 5",
    "assert f() == float('nan')",  # NaN equals nothing: the test could never pass
    "assert f() == 1j",
    "f(1) == 2",
    "x = 1",
    "assert f(1) == 2; assert f(2) == 3",
    "assert (",
    "",
]


@pytest.mark.parametrize("line", NOT_GRADABLE)
def test_parse_assert_refuses(line):
    with pytest.raises(NotGradable):
        parse_assert(line)


def test_a_test_case_must_be_gradable():
    with pytest.raises(NotGradable, match="NaN"):
        TestCase(call="f()", expected=[1.0, float("nan")])
    with pytest.raises(NotGradable, match="not plain data"):
        TestCase(call="f()", expected=object())
    with pytest.raises(NotGradable, match="not an expression"):
        TestCase(call="def f(): pass", expected=1)


def test_load_tests_names_the_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"call": "add(2, 3)", "expected": 5}\n\n{"assert": "assert add(1, 1) == 2"}\n')
    assert load_tests(good) == [
        TestCase(call="add(2, 3)", expected=5),
        TestCase(call="add(1, 1)", expected=2),
    ]
    for body, message in [
        ('{"call": "f()", "expected": 1}\nnot json\n', ":2: not JSON"),
        ('{"assert": "assert f() < 1"}\n', ":1: not gradable"),
        ('{"call": "f()"}\n', ":1: a row is"),
        ('{"call": "f()", "expected": NaN}\n', ":1: the expected value"),
        ("\n", "no test cases"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(NotGradable, match=message):
            load_tests(bad)


# --- values: the encoding, and what equals what -----------------------------------------------

SAME = [
    (5, 5, True),
    (5, 5.0, True),  # Python's int/float equality
    (True, 1, False),  # a bool is its own type
    (1.0, True, False),
    (False, 0, False),
    (True, True, True),
    (None, 0, False),
    ("5", 5, False),
    (b"x", "x", False),
    ([1, 2], (1, 2), False),  # as in Python
    ([1, [2, (3,)]], [1, [2, (3,)]], True),
    ({"a": [1]}, {"a": [1]}, True),
    ({1: "a"}, {True: "a"}, False),
    ({1, 2}, frozenset({2, 1}), True),
    ({1.0}, {1}, True),
    (float("nan"), float("nan"), False),  # NaN equals nothing, itself included
    (-0.0, 0.0, True),
    (10**100, 10**100, True),
]


@pytest.mark.parametrize(("a", "b", "equal"), SAME)
def test_same(a, b, equal):
    assert same(a, b) is equal
    assert same(b, a) is equal


ROUND_TRIP = [
    None,
    True,
    False,
    0,
    -17,
    10**5000,  # hex has no digit limit
    1.5,
    -0.0,
    math.inf,
    "",
    "héllo \U0001f600",
    "\ud800",  # a lone surrogate survives
    b"\x00\xff",
    [1, "a", [None]],
    (1, (2,)),
    {"k": [1, 2], 3: (4,)},
    {1, "two", (3,)},
    frozenset({1}),
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=lambda v: type(v).__name__)
def test_encode_then_decode_is_the_value(value):
    back = decode(json.loads(encode(value)))
    assert same(back, value)
    assert type(back) is (set if type(value) is frozenset else type(value))


class _Int(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


class _List(list):
    def __iter__(self):
        raise AssertionError("the encoder ran the subclass's code")


def test_a_builtin_subclass_travels_as_its_builtin_value():
    from collections import Counter, OrderedDict, namedtuple
    from enum import IntEnum

    point = namedtuple("point", "x y")
    color = IntEnum("color", "red green")
    for value, plain in [
        (_Int(-999), -999),  # its always-true __eq__ never runs
        (_List([1, 2]), [1, 2]),
        (Counter("aab"), {"a": 2, "b": 1}),
        (OrderedDict(k=1), {"k": 1}),
        (point(1, 2), (1, 2)),
        (color.green, 2),
    ]:
        back = decode(json.loads(encode(value)))
        assert type(back) is type(plain) and same(back, plain)


@pytest.mark.parametrize("value", [1j, object(), [1, object()], {"a": {1j}}, range(3), iter([1])])
def test_encode_refuses_what_is_not_plain(value):
    with pytest.raises(TypeError):
        encode(value)


def test_encode_refuses_deep_and_cyclic_values():
    loop: list = []
    loop.append(loop)
    deep: list = []
    for _ in range(70):
        deep = [deep]
    for value in (loop, deep):
        with pytest.raises(TypeError, match="deeper"):
            encode(value)


@pytest.mark.parametrize(
    "tagged",
    [
        ["i", 5],
        ["b", 2],
        ["b", True],
        ["x"],
        "s",
        [],
        ["l", "no"],
        ["d", [[["i", "1"]]]],
        ["S", [["l", []]]],
        ["s", "zz"],
    ],
)
def test_decode_refuses_malformed(tagged):
    with pytest.raises(BadValue):
        decode(tagged)


def test_check_expected():
    check_expected({"a": [1, (2.5, None)], "b": {1, 2}})
    for bad in (float("nan"), [1, {2: float("nan")}], 1j, object(), _Int(1)):
        with pytest.raises(BadValue):
            check_expected(bad)


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_prints_one_json_line(tmp_path):
    program = tmp_path / "add.py"
    program.write_text(HONEST)
    tests = tmp_path / "tests.jsonl"
    tests.write_text('{"call": "add(2, 3)", "expected": 5}\n{"assert": "assert add(1, 1) == 2"}\n')
    proc = _cli("--code", program, "--tests", tests, "--timeout", 2)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"passed": 2, "total": 2, "status": "passed", "reward": 1.0}
    assert proc.stdout.count("\n") == 1


def test_cli_rejects_bad_input_with_the_file_and_line(tmp_path):
    program = tmp_path / "add.py"
    program.write_text(HONEST)
    tests = tmp_path / "tests.jsonl"
    tests.write_text('{"call": "add(2, 3)", "expected": 5}\n{"assert": "assert add(1, 1) > 1"}\n')
    proc = _cli("--code", program, "--tests", tests)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"{tests}:2: not gradable" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _cli("--code", tmp_path / "missing.py", "--tests", tests)
    assert proc.returncode == 2 and "missing.py" in proc.stderr
