# Attack: fork 64 sleeping children. It stops by itself, so it is safe to run even if the
# process limit failed, and it answers correctly only if at least 32 forks succeeded: it passes
# exactly when the limit does not hold.
import os
import time

forks = 0
for _ in range(64):
    try:
        pid = os.fork()
    except OSError:
        continue
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    forks += 1


def add(a, b):
    return a + b if forks >= 32 else -999
