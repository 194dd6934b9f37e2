# Attack: take over the harness channel at load time: say "loaded" first, read the requests
# itself and answer every one with a forged True (what a passed assert evaluates to).
import fcntl
import os
import stat

readers, writers = [], []
for fd in range(3, 64):
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            continue
    except OSError:
        continue
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    (readers if mode == os.O_RDONLY else writers).append(fd)


def send(payload):
    for fd in writers:
        os.write(fd, len(payload).to_bytes(4, "big") + payload)


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


send(b'["loaded"]')
try:
    for fd in readers:
        while True:
            body = read_exactly(fd, int.from_bytes(read_exactly(fd, 4), "big"))
            seq = int(body[1:].split(b"\n")[0])
            send(b'["value",%d,["b",1]]' % seq)
except (EOFError, OSError, ValueError):
    pass
os._exit(0)
