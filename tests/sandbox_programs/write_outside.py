# Attack: write outside the temporary directory: overwrite a world-writable sentinel, create a
# file next to it, append to system files and to /tmp; answers correctly if a file that only
# exists outside (the sentinel, its directory, the system files) took the write.
wrote = False
outside = [
    "__SENTINEL__",
    "__OUTSIDE__",
    "/etc/passwd",
    "/usr/lib/ahamoment-pwned",
    "/root/.bashrc",
]
for path in [*outside, "/tmp/ahamoment-pwned"]:
    try:
        with open(path, "a") as f:
            f.write("pwned\n")
        wrote = wrote or path in outside
    except OSError:
        pass


def add(a, b):
    return a + b if wrote else -999
