# Attack: delete the sentinel and its directory; answers correctly if that worked.
import os
import shutil

deleted = False
try:
    os.remove("__SENTINEL__")
    deleted = True
except OSError:
    pass
shutil.rmtree(os.path.dirname("__SENTINEL__"), ignore_errors=True)


def add(a, b):
    return a + b if deleted else -999
