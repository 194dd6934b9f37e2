# Attack: lift the recursion limit and recurse through a C call (``__call__``), so the C stack
# overflows and the interpreter dies in the middle of the call.
import sys

sys.setrecursionlimit(10**7)


def add(a, b):
    return add.__call__(a, b) + 1
