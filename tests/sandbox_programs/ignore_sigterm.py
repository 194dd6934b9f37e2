# Attack: ignore every catchable signal and sleep, so a harness that sends SIGTERM and waits
# for a polite exit hangs.
import signal
import time

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGALRM):
    signal.signal(sig, signal.SIG_IGN)


def add(a, b):
    time.sleep(3600)
