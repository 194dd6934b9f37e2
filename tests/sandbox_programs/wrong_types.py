# Attack: answers that are equal under a loose comparison but of the wrong type: the right
# digits as a string, True for a truthy int, a one-element list.
def add(a, b):
    s = a + b
    if s == 5:
        return "5"
    if s == 0:
        return False  # False == 0 in Python
    if s == 42:
        return [42]
    return True
