# Attack: crash the interpreter (a harness that treats "no assertion failed" as a pass).
import ctypes


def add(a, b):
    return -999


ctypes.string_at(0)
