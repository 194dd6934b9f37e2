"""The sandbox's child side: ``python -I -S _runner.py SOCKET_FD`` starts the zygote.

Stdlib only, never ahamoment, and only fast imports (no ``json``: 17 ms of ``re`` and
``enum``). Three kinds of process:

- the **zygote** is started once per harness process and forks one outer per program, so a
  program costs a fork instead of an interpreter start; no candidate code ever runs in it;
- the **outer** (the harness's uid) unshares the pid, network and mount namespaces, forks the
  inner, reports both pids on the control pipe, waits for the inner *without reaping it* (its
  pid stays reserved), reports how it ended, and exits when the harness closes the hold pipe.
  Without a pid namespace it is also a child subreaper and kills every descendant left;
- the **inner** is pid 1 of the new pid namespace (when it dies the kernel kills everything it
  left behind). It builds a jail (a tmpfs root with the system and stdlib directories bound
  read-only, a fresh /proc, a writable /sandbox), applies rlimits, drops to a fresh
  unprivileged uid, installs a seccomp filter, says "ready", and only then reads the
  candidate program, runs it, and answers the harness's calls one at a time.

Every mechanism degrades to the next best where the kernel refuses it; the inner reports what
it got in its "ready" frame (written before any candidate code runs, so it can be trusted).
The candidate runs in the inner's interpreter and can rewrite anything here once loaded:
nothing below is a secret, and the harness trusts no frame after "ready" except as a value to
compare with expected values the child never sees.
"""

import builtins
import os
import resource
import sys

# Syscall numbers (x86_64 only: seccomp is skipped on other architectures, see docs/sandbox.md).
_X86_64 = 0xC000003E  # AUDIT_ARCH_X86_64
_SYS = {
    "socket": 41,
    "clone": 56,
    "kill": 62,
    "ptrace": 101,
    "pivot_root": 155,
    "chroot": 161,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,  # io_uring can open sockets without socket(2)
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "mount_setattr": 442,
}
_DENY = [n for n in _SYS if n not in ("socket", "clone", "kill", "clone3")]
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_CLONE_NEWCGROUP = 0x02000000
_NEW_NS = (
    _CLONE_NEWNS
    | _CLONE_NEWUTS
    | _CLONE_NEWIPC
    | _CLONE_NEWUSER
    | _CLONE_NEWPID
    | _CLONE_NEWNET
    | _CLONE_NEWCGROUP
)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_WORKDIR = "/sandbox"  # cwd, HOME and TMPDIR of the candidate inside the jail


# --- the value encoder (the harness decodes with ahamoment.sandbox.values) -------------------

_type, _issubclass = type, issubclass  # bound before a candidate can patch builtins


def encode(value, depth=0):
    """Tagged JSON text for plain data; TypeError for anything else (a 'bad result').

    A subclass of a builtin type (a Counter, a namedtuple, an IntEnum) travels as the builtin
    value it holds, read through the base type's own methods (``int.__format__``,
    ``list.__iter__``, ``dict.items``), so none of its code runs: an int subclass whose
    ``__eq__`` is always True arrives as the plain int inside it. Ints travel in hex, which has
    no digit limit; strings as UTF-8 hex, so nothing needs escaping.
    """
    t = _type(value)
    if value is None:
        return '["N"]'
    if t is bool:
        return '["b",1]' if value else '["b",0]'
    if _issubclass(t, int):
        return '["i","' + int.__format__(value, "x") + '"]'
    if _issubclass(t, float):
        return '["f","' + float.__repr__(value) + '"]'
    if _issubclass(t, str):
        return '["s","' + str.encode(value, "utf-8", "surrogatepass").hex() + '"]'
    if _issubclass(t, bytes):
        return '["y","' + bytes.hex(value) + '"]'
    if depth >= 64:
        raise TypeError("nested deeper than 64 levels")
    for base, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "S")):
        if _issubclass(t, base):
            items = [encode(v, depth + 1) for v in base.__iter__(value)]
            return '["' + tag + '",[' + ",".join(items) + "]]"
    if _issubclass(t, dict):
        pairs = [
            "[" + encode(k, depth + 1) + "," + encode(v, depth + 1) + "]"
            for k, v in dict.items(value)
        ]
        return '["d",[' + ",".join(pairs) + "]]"
    raise TypeError(t.__name__ + " is not plain data")


def _hex(text):
    return str.encode(str(text)[:300], "utf-8", "surrogatepass").hex()


# --- framing: 4-byte big-endian length, then the payload -----------------------------------


def _send(fd, payload):
    data = len(payload).to_bytes(4, "big") + payload
    while data:
        data = data[os.write(fd, data) :]


def _recv(fd):
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    return _read_exactly(fd, int.from_bytes(head, "big"))


def _read_exactly(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# --- the jail ------------------------------------------------------------------------------


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("unshare", "mount", "prctl", "capset"):
            getattr(libc, name)  # all of them, or none (a libc that is not Linux's)
        return ctypes, libc
    except Exception:  # no ctypes (a stripped Python) or no libc: every mechanism degrades
        return None, None


def _mount(ctypes, libc, src, dst, fstype, flags, data=None):
    enc = [None if x is None else x.encode() for x in (src, dst, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], flags, enc[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mount " + str(dst) + ": " + os.strerror(err))


def _mkdirs(root, path, mode=0o755):
    """Create ``root + path`` one component at a time, never following a link (a link in the
    jail may point at the host: following it as root would create directories out there)."""
    cur = root
    for part in path.strip("/").split("/"):
        cur += "/" + part
        if os.path.islink(cur):
            raise OSError("link in the way: " + cur)
        if not os.path.isdir(cur):
            os.mkdir(cur, mode)
    return cur


def _bind(ctypes, libc, src, root, flags=_MS_NOSUID | _MS_NODEV):
    """Bind ``src`` (a real path) read-only at the same path under ``root``."""
    parent = _mkdirs(root, os.path.dirname(src)) if os.path.dirname(src) != "/" else root
    dst = parent + "/" + os.path.basename(src)
    if os.path.lexists(dst):
        return
    if os.path.isdir(src):
        os.mkdir(dst, 0o755)
    else:
        os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
    _mount(ctypes, libc, src, dst, None, _MS_BIND | _MS_REC)
    try:
        _mount(ctypes, libc, None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
    except OSError:  # a locked mount flag in a user namespace: it stays bound, writable by none
        pass


def _build_jail(ctypes, libc, root, disk_mb, uid):
    """A tmpfs root at ``root`` holding only what Python needs, then chroot into it."""
    _mount(ctypes, libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back out
    size = "size=" + str(disk_mb) + "m,nr_inodes=8192,mode=755"
    _mount(ctypes, libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, size)
    wanted = [d for d in _SYSTEM_DIRS if os.path.lexists(d)]
    wanted += [p for p in sys.path if os.path.isdir(p)]
    wanted += [p for p in ("/etc/ld.so.cache",) if os.path.exists(p)]
    bound = []
    for path in wanted:
        if os.path.islink(path) and os.path.dirname(path) == "/":
            if not os.path.lexists(root + path):  # /bin -> usr/bin on merged-/usr systems
                os.symlink(os.readlink(path), root + path)
        real = os.path.realpath(path)
        if any(real == d or real.startswith(d + "/") for d in bound):
            continue
        _bind(ctypes, libc, real, root)
        bound.append(real)
        if real != os.path.abspath(path) and os.path.dirname(path) != "/":
            link = _mkdirs(root, os.path.dirname(path)) + "/" + os.path.basename(path)
            if not os.path.lexists(link):  # sys.path names it through a link: keep the name
                os.symlink(real, link)
    for dev in _DEVICES:
        if os.path.exists("/dev/" + dev):
            _bind(ctypes, libc, "/dev/" + dev, root, flags=_MS_NOSUID)
    _mount(
        ctypes, libc, "proc", _mkdirs(root, "/proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    )
    for d, mode in ((_WORKDIR, 0o700), ("/tmp", 0o1777)):
        path = _mkdirs(root, d)
        os.chmod(path, mode)
        _mount(ctypes, libc, path, path, None, _MS_BIND)  # stays writable when / turns read-only
    if uid is not None:
        os.chown(root + _WORKDIR, uid, uid)
    # The rest of the tmpfs is read-only (a per-mount flag, so the two binds above keep theirs):
    # in a user namespace the candidate owns these directories and could otherwise add files.
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    _mount(ctypes, libc, None, root, None, flags)
    os.chroot(root)
    return _WORKDIR


def _stdlib_world_readable():
    """Whether a process of another uid can import the stdlib (pyenv under /root: no)."""
    for path in sys.path:
        if not os.path.isdir(path):
            continue
        parts = os.path.realpath(path).split("/")
        for i in range(2, len(parts) + 1):
            if os.stat("/".join(parts[:i]) or "/").st_mode & 0o005 != 0o005:
                return False
    return True


def _seccomp(ctypes, libc, block_sockets):
    """A deny-list filter: namespace, mount, ptrace and kernel-module calls fail with EPERM,
    ``kill(-1, ...)`` too, and (where there is no network namespace) every ``socket(2)``.

    Needs no privilege once no_new_privs is set; returns False where it cannot be installed.
    """
    if os.uname().machine != "x86_64":
        return False
    ld_w_abs, jeq, ret, alu_and = 0x20, 0x15, 0x06, 0x54
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    prog = [(ld_w_abs, 0, 0, 4), (jeq, 1, 0, _X86_64), (ret, 0, 0, kill), (ld_w_abs, 0, 0, 0)]
    prog.append((0x35, 0, 1, 0x40000000))  # jge: x32 syscalls are refused
    prog.append((ret, 0, 0, eperm))
    for name in _DENY:
        prog += [(jeq, 0, 1, _SYS[name]), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, _SYS["clone3"]), (ret, 0, 0, enosys)]  # glibc falls back to clone
    if block_sockets:
        prog += [(jeq, 0, 1, _SYS["socket"]), (ret, 0, 0, 0x00050000 | 13)]  # EACCES
    # clone(flags, ...) with any CLONE_NEW* flag (args[0] is at offset 16)
    prog += [(jeq, 0, 4, _SYS["clone"]), (ld_w_abs, 0, 0, 16), (alu_and, 0, 0, _NEW_NS)]
    prog += [(jeq, 1, 0, 0), (ret, 0, 0, eperm), (ld_w_abs, 0, 0, 0)]
    # kill(-1, sig): every process the caller may signal
    prog += [(jeq, 0, 3, _SYS["kill"]), (ld_w_abs, 0, 0, 16), (jeq, 0, 1, 0xFFFFFFFF)]
    prog += [(ret, 0, 0, eperm), (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
    fprog = Prog(len(prog), filters)
    # prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0


def _drop_capabilities(ctypes, libc):
    """capset(2) with empty sets: the capabilities a user namespace grants its first process
    would otherwise let the candidate undo the jail (e.g. chroot out of it)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all zero
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: not even an exec can regain one
    return libc.capset(header, data) == 0


def _block_socket_imports():
    """The weakest fallback: the candidate cannot ``import socket`` (it can undo this)."""
    for name in ("_socket", "socket", "_ssl", "ssl"):
        sys.modules[name] = None


def _close_fds_except(keep):
    lo = 0
    for fd in sorted(keep) + [1 << 16]:
        if lo < fd:  # closerange(n, n) would close every fd (close_range(n, -1) in 3.11)
            os.closerange(lo, fd)
        lo = fd + 1


# --- outer and inner -----------------------------------------------------------------------


def zygote(sock_fd):
    """Fork one outer per request, forever: ``python -I -S`` starts once, not per program.

    A request is one SOCK_SEQPACKET message: the run's ``key=value`` config, and five fds
    (calls, replies, control, output, hold) passed by SCM_RIGHTS. No candidate code ever runs
    here, so every program starts from the same clean interpreter. Exits when the harness
    closes its end of the socket.
    """
    import _signal
    import _socket

    sock = _socket.socket(fileno=sock_fd)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)  # the kernel reaps our outers
    libs = _libc()
    while True:
        try:
            msg, anc, _, _ = sock.recvmsg(1 << 16, _socket.CMSG_SPACE(5 * 4))
        except InterruptedError:
            continue
        if not msg:
            os._exit(0)
        fds = []
        for level, kind, data in anc:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [
                    int.from_bytes(data[i : i + 4], sys.byteorder)
                    for i in range(0, len(data) - 3, 4)
                ]
        try:
            pid = os.fork() if len(fds) == 5 else -1
        except OSError:
            pid = -1
        if pid == 0:
            code = 70
            try:
                sock.close()  # a candidate must never reach the zygote
                _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
                cfg = dict(a.split("=", 1) for a in msg.decode().split("\0"))
                _outer(cfg, fds, libs)  # returns in neither process: both end in os._exit
            except SystemExit as e:  # the candidate's sys.exit() at load or in a call
                code = e.code if type(e.code) is int else 0 if e.code is None else 1
            except BaseException:
                sys.excepthook(*sys.exc_info())
            finally:
                os._exit(code & 0xFF)
        for fd in fds:  # the outer has its copies; a refused request just closes them
            os.close(fd)


def _outer(cfg, fds, libs):
    """Unshare the namespaces, fork the inner, report its pid and how it ended."""
    req, resp, ctl, out, hold = fds
    os.setsid()
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.dup2(hold, 0)  # EOF here: the harness is done with us
    os.close(out)
    os.close(hold)
    os.chdir(cfg["dir"])
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    force = cfg.get("force", "")  # "rlimits": no namespaces; "rlimits-noseccomp": nor seccomp
    ctypes, libc = libs
    is_root = os.geteuid() == 0
    ns = False
    if libc is not None and not force:
        flags = _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWNS
        if not is_root:
            flags |= _CLONE_NEWUSER
        uid, gid = os.getuid(), os.getgid()
        ns = libc.unshare(flags) == 0
        if ns and not is_root:
            try:  # map our own uid to itself, so files we touch keep their owner
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1")):
                    with open("/proc/self/" + name, "w") as f:
                        f.write(text)
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"{gid} {gid} 1")
            except OSError:
                ns = False  # the other namespaces exist but we cannot use them: fall back
    if libc is not None and not ns:
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: a same-uid candidate cannot open our fds
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us, not to init
    pid = os.fork()
    if pid == 0:
        _inner(cfg, req, resp, ctl, ctypes, libc, ns, is_root)
    os.close(req)
    os.close(resp)
    os.write(ctl, b"hello %d %d\n" % (os.getpid(), pid))
    while True:
        try:  # WNOWAIT: the inner stays a zombie, so its pid is not reused while we live
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            break
        except InterruptedError:
            continue
    if not ns:
        _kill_descendants()  # with a pid namespace the kernel has done this already
    os.write(ctl, b"exit %d %d\n" % (info.si_code, info.si_status))
    os.close(ctl)
    while os.read(0, 4096):
        pass
    if ns:
        os.waitpid(pid, 0)  # reap it ourselves: not every init reaps (a container's may not)
    else:
        _kill_descendants()
    os._exit(0)


def _kill_descendants():
    """SIGKILL every process below us, until none is left. As a child subreaper we inherit
    every orphan, so a daemon that double-forked and called setsid is still found here."""
    me = str(os.getpid())
    while True:
        try:  # reap whatever has died; ChildProcessError: no children left at all
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        for name in os.listdir("/proc"):
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    stat = f.read()
                ppid = stat[stat.rindex(b")") + 2 :].split()[1]
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me.encode():
                try:
                    os.kill(int(name), 9)
                except OSError:
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _inner(cfg, req, resp, ctl, ctypes, libc, ns, is_root):
    os.close(ctl)
    os.setsid()  # kill(0, ...) from the candidate reaches only its own group
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    uid = int(cfg["uid"]) if is_root else None
    report = {"pid_ns": ns, "net_ns": ns, "fs_jail": False, "uid": "own", "seccomp": False}
    workdir = cfg["dir"]
    if ns:
        try:
            workdir = _build_jail(ctypes, libc, cfg["dir"], int(cfg["disk_mb"]), uid)
            report["fs_jail"] = True
        except OSError:
            pass  # keep the real filesystem (see docs/sandbox.md: what the fallback loses)
    os.chdir(workdir)
    os.umask(0o077)
    for key in ("HOME", "TMPDIR", "PWD"):
        os.environ[key] = workdir
    cpu = int(cfg["cpu_s"])
    nproc = int(cfg["processes"]) + (1 if ns and not is_root else 0)  # the outer counts there
    mem = int(cfg["memory_mb"]) << 20
    for name, value in (
        ("RLIMIT_CPU", (cpu, cpu + 1)),  # SIGXCPU first, SIGKILL a second later
        ("RLIMIT_AS", (mem, mem)),
        ("RLIMIT_FSIZE", (int(cfg["file_mb"]) << 20,) * 2),
        ("RLIMIT_NOFILE", (int(cfg["open_files"]),) * 2),
        ("RLIMIT_NPROC", (nproc, nproc)),
        ("RLIMIT_CORE", (0, 0)),
        ("RLIMIT_MEMLOCK", (0, 0)),
        ("RLIMIT_MSGQUEUE", (0, 0)),
    ):
        try:
            resource.setrlimit(getattr(resource, name), value)
        except (AttributeError, ValueError, OSError):
            pass
    if uid is not None:  # never run a candidate as root, even where the stdlib is unreadable
        report["stdlib"] = report["fs_jail"] or _stdlib_world_readable()
        if not report["fs_jail"]:
            os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # drops every capability; RLIMIT_NPROC binds: the fresh uid counts only us
        report["uid"] = "random"
    elif ns and libc is not None:
        report["caps"] = _drop_capabilities(ctypes, libc)  # those a user namespace gave us
    if libc is not None:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary raises us again
        try:
            if cfg.get("force") != "rlimits-noseccomp":
                report["seccomp"] = _seccomp(ctypes, libc, block_sockets=not ns)
        except Exception:
            report["seccomp"] = False
    if not ns and not report["seccomp"]:
        _block_socket_imports()
    report["net"] = "netns" if ns else "seccomp" if report["seccomp"] else "import-block"
    _close_fds_except({0, 1, 2, req, resp})
    items = ",".join(f'"{k}":{_js(v)}' for k, v in report.items())
    _send(resp, b'["ready",{' + items.encode() + b"}]")
    _serve(req, resp)


def _js(v):
    return "true" if v is True else "false" if v is False else '"' + str(v) + '"'


def _serve(req, resp):
    """Load the candidate, then answer one call at a time until the harness hangs up."""
    send, recv, enc, hexs = _send, _recv, encode, _hex  # bound before the candidate runs
    frame = recv(req)
    if frame is None or frame[:1] != b"P":
        os._exit(3)
    source = frame[1:].decode("utf-8", "replace")
    del frame
    try:
        code = compile(source, "<candidate>", "exec")
    except BaseException as e:  # SyntaxError, ValueError (NUL bytes), RecursionError, ...
        send(resp, ('["syntax","' + hexs(type(e).__name__ + ": " + str(e)) + '"]').encode())
        os._exit(0)
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    sys.argv[:] = ["candidate"]
    try:
        exec(code, namespace)
    except Exception as e:  # SystemExit and KeyboardInterrupt end the process: 'exited'
        msg = type(e).__name__ + ": " + str(e)
        send(resp, ('["load_error","' + type(e).__name__ + '","' + hexs(msg) + '"]').encode())
        os._exit(0)
    send(resp, b'["loaded"]')
    while True:
        frame = recv(req)
        if frame is None:
            os._exit(0)
        seq, _, call = frame[1:].partition(b"\n")
        seq = int(seq)
        try:
            value = eval(compile(call.decode(), "<test>", "eval"), namespace)
        except Exception as e:
            name = type(e).__name__
            msg = hexs(name + ": " + str(e))
            send(resp, f'["raised",{seq},"{name}","{msg}"]'.encode())
            continue
        try:
            text = enc(value)
        except Exception as e:  # TypeError (not plain data), RecursionError, MemoryError
            send(resp, f'["bad",{seq},"{hexs(e)}"]'.encode())
            continue
        send(resp, f'["value",{seq},{text}]'.encode())


if __name__ == "__main__":
    zygote(int(sys.argv[1]))
