"""Run one untrusted program against test cases in a jailed child process, or many in parallel.

The harness side of the sandbox (the child side is ``_runner.py``; docs/sandbox.md says what
is guaranteed on which kernel). One run:

1. ask the zygote (one ``python -I -S _runner.py`` per harness process, see there) to fork a
   fresh outer and inner, handing it five pipes: calls in, replies out, a control pipe
   written only by the outer (the host pids, then how the inner ended), the program's merged
   stdout/stderr (capped), and a hold pipe whose closing lets the outer go;
2. wait for "ready" (written before any candidate code runs: it reports the isolation got),
   send the program, wait for "loaded";
3. send the calls **one at a time**, each with a sequence number, and compare every reply's
   decoded value with the expected value *here* (``values.same``); the expected values never
   reach the child, and a test passes only on a well-formed reply to exactly that request;
4. kill the inner by pidfd (pid 1 of its pid namespace: the kernel then kills everything it
   left), reap, delete the temporary directory.

Exit status never means success, stdout is never parsed, and any reply the harness did not ask
for ends the run as ``protocol_error``. Every status but "passed" and "failed" scores 0.
"""

from __future__ import annotations

import array
import atexit
import json
import logging
import math
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ahamoment.sandbox.cases import TestCase
from ahamoment.sandbox.values import BadValue, decode, same

log = logging.getLogger(__name__)

STATUSES: dict[str, str] = {
    "passed": "every test returned its expected value",
    "failed": "every test ran; at least one returned a wrong value or raised",
    "syntax_error": "the program does not compile",
    "load_error": "the program raised while being loaded (module level)",
    "exited": "the program ended (sys.exit, os._exit, a closed channel) before answering all",
    "crash": "the program was killed by a signal (segfault, abort, ...)",
    "timeout": "the wall-clock timeout or the CPU-time limit ran out",
    "memory": "the program ran out of its memory limit (MemoryError)",
    "output_limit": "the program wrote more than the stdout/stderr cap",
    "bad_result": "a call returned a value that is not plain data, or too large a one",
    "protocol_error": "a reply the harness did not ask for, or could not read (forged frames)",
    "not_gradable": "no test cases: nothing can be passed",
    "sandbox_error": "the sandbox itself failed to start (never the program's fault)",
}
"""Every status a Result can have. Only "passed" and "failed" earn a reward above 0."""

_RUNNER = str(Path(__file__).with_name("_runner.py"))
_UID_BASE = 1 << 30  # random uids for candidates: far above any real account


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run (the wall-clock timeout is an argument of run_tests)."""

    memory_mb: int = 512
    """Address space of each process (RLIMIT_AS), in MiB."""
    file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), in MiB."""
    disk_mb: int = 64
    """Size of the jail's tmpfs: all files together, in MiB (kept in RAM)."""
    processes: int = 16
    """Processes and threads the program may have at once, itself included (RLIMIT_NPROC)."""
    open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    output_bytes: int = 64 * 1024
    """stdout and stderr together; one byte more ends the run as output_limit."""
    result_bytes: int = 1 << 20
    """Largest encoded return value of one call; larger ends the run as bad_result."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError("Limits.memory_mb below 64 leaves no room for Python itself")


@dataclass(frozen=True)
class Result:
    """What one run of a program against its tests came to."""

    passed: int
    """Tests whose reply equalled the expected value (counted until the run ended)."""
    total: int
    """Tests given (the reward's denominator)."""
    status: str
    """One of STATUSES."""
    detail: str = ""
    """A short human-readable reason (the first failing test, the signal, ...). Logs only."""
    output: str = ""
    """The program's stdout and stderr, merged, up to Limits.output_bytes."""
    seconds: float = 0.0
    """Wall-clock time of the whole run, clean-up included."""
    isolation: dict[str, Any] = field(default_factory=dict)
    """What the child reported before the program ran: pid_ns, net_ns, fs_jail, uid, ..."""

    def reward(self, partial: bool = True) -> float:
        """passed/total (or 1/0 all-or-nothing) if every test ran, else 0."""
        if self.status not in ("passed", "failed") or self.total == 0:
            return 0.0
        if not partial:
            return 1.0 if self.passed == self.total else 0.0
        return self.passed / self.total


def run_tests(
    code: str,
    tests: Sequence[TestCase],
    *,
    timeout: float = 2.0,
    limits: Limits | None = None,
) -> Result:
    """Run ``code`` in a fresh sandbox and grade it on ``tests``.

    ``timeout`` is the wall-clock budget of the whole run (start, load, every call), in
    seconds; the call returns within about ``timeout`` plus the time to kill and clean up.
    """
    return _force_run(code, tests, timeout=timeout, limits=limits)


def _force_run(
    code: str,
    tests: Sequence[TestCase],
    *,
    timeout: float,
    limits: Limits | None,
    force: str = "",
) -> Result:
    # force="rlimits" makes the runner skip namespaces and seccomp's setup through ctypes, so
    # tests exercise the fallback on a machine that has the real thing.
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    tests = list(tests)
    for t in tests:
        if not isinstance(t, TestCase):
            raise TypeError(f"tests must be TestCase objects, got {type(t).__name__}")
    if not tests:
        return Result(passed=0, total=0, status="not_gradable", detail="no test cases")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return _Run(code, tests, timeout, limits or Limits(), force).result()


def run_many(
    jobs: Sequence[tuple[str, Sequence[TestCase]]],
    *,
    timeout: float = 2.0,
    limits: Limits | None = None,
    workers: int | None = None,
) -> list[Result]:
    """run_tests on every ``(code, tests)`` job, ``workers`` at a time; results in job order.

    Each job's work happens in its own sandbox process, so the pool is threads that drive
    those processes (no pickling, no fork of a large trainer): ``workers`` defaults to the
    CPUs this process may run on.
    """
    n = workers or _cpus()
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sandbox") as pool:
        return list(
            pool.map(lambda job: run_tests(job[0], job[1], timeout=timeout, limits=limits), jobs)
        )


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_ISOLATION: dict[str, Any] = {}


def isolation() -> dict[str, Any]:
    """What the sandbox gets on this machine (runs one trivial program the first time)."""
    if not _ISOLATION:
        r = run_tests("def f():\n    return 1\n", [TestCase(call="f()", expected=1)], timeout=10)
        _ISOLATION.update(r.isolation or {"error": r.status + ": " + r.detail})
    return dict(_ISOLATION)


def _note_isolation(report: dict[str, Any]) -> None:
    if _ISOLATION:
        return
    _ISOLATION.update(report)
    weak = [k for k in ("pid_ns", "net_ns", "fs_jail") if not report.get(k)]
    if weak:
        log.warning(
            "sandbox: this kernel refuses %s; running with the fallbacks in docs/sandbox.md (%s)",
            ", ".join(weak),
            report,
        )


class _Run:
    """One sandboxed run: spawn, converse, judge, clean up (see the module docstring)."""

    def __init__(
        self, code: str, tests: list[TestCase], timeout: float, limits: Limits, force: str
    ):
        self.tests, self.limits, self.force = tests, limits, force
        self.code = code.encode("utf-8", "surrogatepass")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.cpu_s = math.ceil(timeout) + 1
        self.uid = _UID_BASE + random.SystemRandom().randrange(1 << 30)
        self.passed, self.next_seq, self.phase = 0, 0, "ready"
        self.status, self.detail = "", ""
        self.report: dict[str, Any] = {}
        self.rbuf, self.wbuf, self.out = bytearray(), bytearray(), bytearray()
        self.inner_pid, self.pidfd, self.outer_pidfd, self.exit_info = 0, -1, -1, None
        self.ctl_buf = b""

    # --- the run ------------------------------------------------------------------------

    def result(self) -> Result:
        workdir = tempfile.mkdtemp(prefix="ahamoment-sandbox-")
        fds: list[int] = []
        try:
            try:
                fds = self._spawn(workdir)
            except OSError as e:
                self._end("sandbox_error", f"cannot start the sandbox: {e}")
            else:
                self._converse(fds)
        finally:
            self._clean_up(fds, workdir)
        return Result(
            passed=self.passed,
            total=len(self.tests),
            status=self.status,
            detail=self.detail,
            output=bytes(self.out[: self.limits.output_bytes]).decode("utf-8", "replace"),
            seconds=time.monotonic() - self.t0,
            isolation=self.report,
        )

    def _spawn(self, workdir: str) -> list[int]:
        pipes = [os.pipe() for _ in range(5)]  # calls, replies, control, output, hold
        lim = self.limits
        cfg = {
            "dir": workdir,
            "uid": self.uid,
            "cpu_s": self.cpu_s,
            "memory_mb": lim.memory_mb,
            "file_mb": lim.file_mb,
            "disk_mb": lim.disk_mb,
            "processes": lim.processes,
            "open_files": lim.open_files,
            "force": self.force,
        }
        (req_r, req_w), (resp_r, resp_w), (ctl_r, ctl_w), (out_r, out_w), (hold_r, hold_w) = pipes
        try:
            _ZYGOTE.spawn(
                "\0".join(f"{k}={v}" for k, v in cfg.items()), [req_r, resp_w, ctl_w, out_w, hold_r]
            )
        except OSError:
            for fd in (req_w, resp_r, ctl_r, out_r, hold_w):
                os.close(fd)
            raise
        finally:
            for fd in (req_r, resp_w, ctl_w, out_w, hold_r):
                os.close(fd)
        for fd in (req_w, resp_r, ctl_r, out_r):
            os.set_blocking(fd, False)
        return [req_w, resp_r, ctl_r, out_r, hold_w]

    def _converse(self, fds: list[int]) -> None:
        req_w, resp_r, ctl_r, out_r, _ = fds
        self._queue(b"P" + self.code)  # the program only; tests follow after "loaded"
        poll = select.poll()
        for fd in (resp_r, ctl_r, out_r):
            poll.register(fd, select.POLLIN)
        open_fds = {resp_r, ctl_r, out_r}
        writing = False
        while not self.status:
            if self.wbuf and not writing:
                poll.register(req_w, select.POLLOUT)
                writing = True
            left = self.deadline - time.monotonic()
            if left <= 0:
                if self.phase == "ready":
                    self._end("sandbox_error", "the sandbox did not start within the timeout")
                else:
                    self._end("timeout", f"no answer within {self.deadline - self.t0:.1f} s")
                break
            for fd, _ in poll.poll(left * 1000):
                if fd == req_w:
                    self._write(req_w)
                    if not self.wbuf:
                        poll.unregister(req_w)
                        writing = False
                    continue
                data = self._read(fd)
                if data is None:
                    continue
                if not data:  # EOF: every writer is gone
                    poll.unregister(fd)
                    open_fds.discard(fd)
                elif fd == resp_r:
                    self.rbuf += data
                    self._frames()
                elif fd == ctl_r:
                    self._control(data)
                else:
                    self.out += data
                    if len(self.out) > self.limits.output_bytes:
                        self._end(
                            "output_limit", f"over {self.limits.output_bytes} bytes of output"
                        )
                if self.status:
                    break
            if not self.status and (resp_r not in open_fds or self.exit_info is not None):
                self._died(resp_r, ctl_r, open_fds)

    def _died(self, resp_r: int, ctl_r: int, open_fds: set[int]) -> None:
        """The inner ended, or closed its reply channel, before the run was complete.

        A dying inner's exit report follows within milliseconds; one that closed its channel
        and lives on can never answer again, so it ends as "exited" after a short wait.
        """
        until = min(self.deadline, time.monotonic() + 0.5)
        while self.exit_info is None and ctl_r in open_fds and time.monotonic() < until:
            r, _, _ = select.select([ctl_r], [], [], max(0.0, until - time.monotonic()))
            data = self._read(ctl_r) if r else None
            if data == b"":
                open_fds.discard(ctl_r)
            elif data:
                self._control(data)
        if resp_r in open_fds:  # replies written just before the end still count
            while (data := self._read(resp_r)) and not self.status:
                self.rbuf += data
                self._frames()
        if self.status:
            return
        started = self.phase != "ready"
        if self.exit_info is None and ctl_r in open_fds:
            self._end("exited" if started else "sandbox_error", "closed its reply channel")
            return
        if self.exit_info is None:
            self._end("crash" if started else "sandbox_error", "the sandbox process vanished")
            return
        code, status = self.exit_info
        if code == 1:  # CLD_EXITED
            if not started:
                tail = bytes(self.out[-300:]).decode("utf-8", "replace")
                self._end("sandbox_error", f"the runner exited {status} before ready: {tail}")
            else:
                self._end("exited", f"exit code {status} before every test was answered")
        else:  # CLD_KILLED, CLD_DUMPED
            try:
                name = signal.Signals(status).name
            except ValueError:
                name = f"signal {status}"
            if status == signal.SIGXCPU:
                self._end("timeout", f"CPU limit of {self.cpu_s} s ({name})")
            else:
                self._end("crash" if started else "sandbox_error", f"killed by {name}")

    # --- frames -------------------------------------------------------------------------

    def _frames(self) -> None:
        while len(self.rbuf) >= 4 and not self.status:
            n = int.from_bytes(self.rbuf[:4], "big")
            if n > self.limits.result_bytes:
                status = "bad_result" if self.phase == "calls" else "protocol_error"
                self._end(status, f"a reply of {n} bytes (limit {self.limits.result_bytes})")
                return
            if len(self.rbuf) < 4 + n:
                return
            payload = bytes(self.rbuf[4 : 4 + n])
            del self.rbuf[: 4 + n]
            try:
                frame = json.loads(payload)
            except (ValueError, RecursionError):
                frame = None
            if not isinstance(frame, list) or not frame or not isinstance(frame[0], str):
                self._end("protocol_error", f"an unreadable reply in phase {self.phase}")
                return
            self._frame(frame)

    def _frame(self, frame: list) -> None:
        kind, args = frame[0], frame[1:]
        if self.phase == "ready":
            if kind == "ready" and len(args) == 1 and isinstance(args[0], dict):
                self.report = args[0]
                if not self.force:
                    _note_isolation(self.report)
                self.phase = "loading"
                return
        elif self.phase == "loading":
            if kind == "loaded" and not args:
                self.phase = "calls"
                self._send_call()
                return
            if kind == "syntax" and len(args) == 1:
                self._end("syntax_error", _unhex(args[0]))
                return
            if kind == "load_error" and len(args) == 2:
                status = "memory" if args[0] == "MemoryError" else "load_error"
                self._end(status, _unhex(args[1]))
                return
        elif self.phase == "calls" and args and args[0] == self.next_seq and type(args[0]) is int:
            test = self.tests[self.next_seq]
            if kind == "value" and len(args) == 2:
                try:
                    value = decode(args[1])
                except (BadValue, RecursionError) as e:
                    self._end("protocol_error", f"test {self.next_seq}: {e}")
                    return
                if same(value, test.expected):
                    self.passed += 1
                elif not self.detail:
                    self.detail = (
                        f"{test.call} returned {_short(value)}, expected {_short(test.expected)}"
                    )
                self._advance()
                return
            if kind == "raised" and len(args) == 3:
                if args[1] == "MemoryError":
                    self._end("memory", f"{test.call}: MemoryError")
                    return
                if not self.detail:
                    self.detail = f"{test.call} raised {_unhex(args[2])}"
                self._advance()
                return
            if kind == "bad" and len(args) == 2:
                self._end("bad_result", f"{test.call} returned {_unhex(args[1])}")
                return
        self._end("protocol_error", f"an unexpected {kind!r} reply in phase {self.phase}")

    def _advance(self) -> None:
        self.next_seq += 1
        if self.next_seq == len(self.tests):
            failed = self.passed < len(self.tests)
            self._end("failed" if failed else "passed", self.detail)
        else:
            self._send_call()

    def _send_call(self) -> None:
        call = self.tests[self.next_seq].call.encode("utf-8", "surrogatepass")
        self._queue(b"C%d\n" % self.next_seq + call)

    def _control(self, data: bytes) -> None:
        self.ctl_buf += data
        *lines, self.ctl_buf = self.ctl_buf.split(b"\n")
        for line in lines:
            parts = line.split()
            if parts[:1] == [b"hello"] and len(parts) == 3 and not self.inner_pid:
                self.inner_pid = int(parts[2])
                self.outer_pidfd = _pidfd(int(parts[1]))
                self.pidfd = _pidfd(self.inner_pid)  # a pidfd never points at a reused pid
            elif parts[:1] == [b"exit"] and len(parts) == 3:
                self.exit_info = (int(parts[1]), int(parts[2]))

    def _end(self, status: str, detail: str) -> None:
        if not self.status:
            self.status = status
            self.detail = detail[:500]

    # --- io -----------------------------------------------------------------------------

    def _queue(self, payload: bytes) -> None:
        self.wbuf += len(payload).to_bytes(4, "big") + payload

    def _write(self, fd: int) -> None:
        try:
            n = os.write(fd, self.wbuf)
        except BlockingIOError:
            return
        except OSError:  # the child is gone; its death is noticed on the other pipes
            self.wbuf.clear()
            return
        del self.wbuf[:n]

    def _read(self, fd: int) -> bytes | None:
        try:
            return os.read(fd, 1 << 16)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    # --- clean-up -----------------------------------------------------------------------

    def _clean_up(self, fds: list[int], workdir: str) -> None:
        try:
            if fds:
                self._kill(fds)
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            for fd in (self.pidfd, self.outer_pidfd):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def _kill(self, fds: list[int]) -> None:
        ctl_r = fds[2]
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif self.inner_pid:  # no pidfd (Linux < 5.3): the outer keeps the pid reserved
            _signal(self.inner_pid, signal.SIGKILL)
        # The outer reports the inner's end once nothing of the program is left (the kernel
        # has emptied the pid namespace, or the outer has killed every descendant).
        until = time.monotonic() + 2.0
        while self.inner_pid and self.exit_info is None and time.monotonic() < until:
            r, _, _ = select.select([ctl_r], [], [], until - time.monotonic())
            data = self._read(ctl_r) if r else b""
            if not data and data is not None:
                break
            if data:
                self._control(data)
        if self.report.get("pid_ns") is not True and self.inner_pid:
            _kill_strays(self.uid if self.report.get("uid") == "random" else None, self.inner_pid)
        os.close(fds[4])  # the hold pipe: the outer may go
        fds[4] = -1
        if self.outer_pidfd >= 0:  # a pidfd turns readable when its process has exited
            if not select.select([self.outer_pidfd], [], [], 2.0)[0]:
                signal.pidfd_send_signal(self.outer_pidfd, signal.SIGKILL)


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1


class _Zygote:
    """The harness process's one zygote (``_runner.zygote``), started on first use and again
    after a fork of this process or a death of the zygote."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        self.owner = 0

    def spawn(self, cfg: str, fds: list[int]) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        with self.lock:
            for attempt in range(2):
                if self.sock is None or self.owner != os.getpid() or self.proc.poll() is not None:
                    self._start()
                try:
                    self.sock.sendmsg([cfg.encode()], rights)
                    return
                except OSError:
                    self.sock.close()
                    self.sock = None
                    if attempt:
                        raise

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [os.path.realpath(sys.executable), "-I", "-S", _RUNNER, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env=_zygote_env(),
                start_new_session=True,  # no Ctrl-C from our terminal
            )
        finally:
            theirs.close()
        self.sock, self.owner = ours, os.getpid()

    def close(self) -> None:
        if self.sock is not None and self.owner == os.getpid():
            self.sock.close()  # the zygote exits on EOF
            self.sock = None
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _zygote_env() -> dict[str, str]:
    # LD_LIBRARY_PATH only where Python itself needs it to start; the outer clears it
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


_ZYGOTE = _Zygote()
atexit.register(_ZYGOTE.close)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_strays(uid: int | None, session: int) -> None:
    """Without a pid namespace, a second net under the outer's subreaper sweep: kill every
    process of the run's fresh uid (when we are root), or else every process still in the
    inner's session (a session id is not reused while any process holds it)."""
    if not os.path.isdir("/proc"):
        return
    for _ in range(5):  # a fork in flight may add one more: look again until none is left
        found = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if uid is not None:
                    with open(f"/proc/{name}/status", "rb") as f:
                        line = next(x for x in f if x.startswith(b"Uid:"))
                    hit = int(line.split()[1]) == uid
                else:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read()
                    hit = int(stat[stat.rindex(b")") + 2 :].split()[4]) == session
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            if hit:
                _signal(int(name), signal.SIGKILL)
                found += 1
        if not found:
            return
        time.sleep(0.01)


def _unhex(text: Any) -> str:
    try:
        return bytes.fromhex(str(text)).decode("utf-8", "replace")
    except ValueError:
        return "?"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
