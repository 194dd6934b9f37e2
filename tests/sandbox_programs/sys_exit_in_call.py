# Attack: exit with status 0 from inside the call under test.
import sys


def add(a, b):
    sys.exit(0)
