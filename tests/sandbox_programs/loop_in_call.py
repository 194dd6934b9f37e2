# Attack: hang inside the call under test.
def add(a, b):
    while True:
        pass
