# Attack: allocate 2 GiB and touch it; answers correctly only if that worked (the memory limit
# failed), then grows a list until something gives.
try:
    big = bytearray(2 << 30)
    big[:: 1 << 12] = b"x" * len(big[:: 1 << 12])
except MemoryError:
    big = None


def add(a, b):
    if big is not None:
        return a + b
    hog = []
    while True:
        hog.append(" " * (1 << 20))
