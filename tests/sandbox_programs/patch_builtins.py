# Attack: patch builtins a harness in the same process would use to check the answer:
# AssertionError becomes harmless, isinstance/type/repr lie, and the answer is always-equal.
import builtins


class Anything(str):
    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


builtins.AssertionError = type("AssertionError", (Exception,), {})
builtins.isinstance = lambda obj, cls: True
builtins.type = lambda *args: int if len(args) == 1 else type(*args)
builtins.repr = lambda obj: "5"
builtins.str = Anything


def add(a, b):
    return Anything("5")
