# Attack: close every descriptor but stdio, so the harness gets no replies at all (a harness
# that reads "no failures" as success passes it).
import os


def add(a, b):
    return -999


os.closerange(3, 1 << 16)
