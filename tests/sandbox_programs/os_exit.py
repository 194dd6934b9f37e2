# Attack: os._exit(0), which skips every finally block and atexit handler.
import os


def add(a, b):
    return -999


os._exit(0)
