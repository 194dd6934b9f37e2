# Attack: leave daemons behind: double fork, setsid, ignore SIGHUP, clear the parent-death
# signal, and exec a long sleep (marked so the test can find it); one stays in Python.
import ctypes
import os
import signal
import time

for kind in ("exec", "python"):
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if os.fork() == 0:
            ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG 0
            if kind == "exec":
                os.execv("/bin/sleep", ["sleep", "__MARK__"])
            time.sleep(600)
        os._exit(0)


def add(a, b):
    return -999
