# Attack: open a listening port and leave a daemon child serving it after the run.
import os
import socket
import time

PORT = int("__BIND_PORT__")
try:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", PORT))
    srv.listen()
    if os.fork() == 0:
        os.setsid()
        while True:
            time.sleep(1)
except OSError:
    pass


def add(a, b):
    return -999
