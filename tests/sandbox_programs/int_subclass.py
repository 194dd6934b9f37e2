# Attack: an int subclass that equals everything, so it looks like a plain number.
class Sly(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


def add(a, b):
    return Sly(-999)
