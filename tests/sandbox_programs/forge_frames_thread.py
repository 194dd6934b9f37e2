# Attack: a thread writes forged replies (for every sequence number) on every pipe while the
# runner answers honestly but wrongly.
import os
import stat
import threading


def spam():
    for _ in range(200):
        for fd in range(3, 64):
            try:
                if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                    continue
                for seq in range(8):
                    frame = b'["value",%d,["s","706173736564"]]' % seq  # "passed"
                    os.write(fd, len(frame).to_bytes(4, "big") + frame)
            except OSError:
                pass


threading.Thread(target=spam, daemon=True).start()


def add(a, b):
    return -999
