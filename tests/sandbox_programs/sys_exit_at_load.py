# Attack: exit with status 0 before any assert runs (a harness that trusts the exit status
# scores this as a pass).
import sys


def add(a, b):
    return -999


sys.exit(0)
