# Attack: look for the expected values in this process's memory (gc objects, the runner's
# globals, frames up the stack), and answer from them.
import gc
import sys

table = {}


def harvest():
    for obj in gc.get_objects():
        if isinstance(obj, dict) and "expected" in obj and "call" in obj:
            table[str(obj["call"])] = obj["expected"]
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if hasattr(value, "expected") and hasattr(value, "call"):
                table[value.call] = value.expected
        frame = frame.f_back


def add(a, b):
    harvest()
    return table.get(f"add({a}, {b})", -999)
