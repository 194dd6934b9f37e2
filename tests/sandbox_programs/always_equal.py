# Attack: return an object equal to everything (a harness that runs `assert add(..) == 5` in
# the candidate's process passes it).
class Anything:
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = object.__hash__


def add(a, b):
    return Anything()
