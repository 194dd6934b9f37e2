# Attack: reach the network: a listener on the host's loopback and an outside address,
# through the socket module, the _socket extension or raw libc; answers correctly only if a
# connection was made.
PORT = int("__PORT__")
connected = False
try:
    import socket

    for addr in (("127.0.0.1", PORT), ("1.1.1.1", 80)):
        try:
            s = socket.create_connection(addr, timeout=0.3)
            s.sendall(b"pwned")
            connected = True
        except OSError:
            pass
except ImportError:
    pass
if not connected:
    try:
        import _socket

        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.settimeout(0.3)
        s.connect(("127.0.0.1", PORT))
        s.send(b"pwned")
        connected = True
    except (ImportError, OSError):
        pass
if not connected:
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
        addr = (2).to_bytes(2, "little") + PORT.to_bytes(2, "big") + bytes([127, 0, 0, 1])
        addr += bytes(8)
        if fd >= 0 and libc.connect(fd, addr, 16) == 0:
            libc.write(fd, b"pwned", 5)
            connected = True
    except (ImportError, OSError):
        pass


def add(a, b):
    return a + b if connected else -999
