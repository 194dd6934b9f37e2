# Attack: fill the disk with 256 MiB in 1 MiB chunks over many files; answers correctly only
# if all of it could be written (no file-size or disk limit).
written = 0
chunk = b"\0" * (1 << 20)
for i in range(256):
    try:
        with open(f"fill{i % 64}.bin", "ab") as f:
            f.write(chunk)
        written += len(chunk)
    except OSError:
        pass


def add(a, b):
    return a + b if written >= 256 << 20 else -999
