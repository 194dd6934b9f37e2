"""Helpers importable from test modules (tests/ is on sys.path under pytest's rootdir)."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ahamoment.models import r1_zero_prompt


@contextmanager
def serve_on_loopback(app, log_level: str = "warning") -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until the server takes it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


def corpus_text() -> str:
    return (
        r1_zero_prompt(
            "Using the numbers [13, 7, 5], create an equation that equals 15. "
            "You can use + and - and each number must be used exactly once."
        )
        + "<think>\n13+7=20,20-5=15,yes\n</think>\n<answer>13+7-5</answer>"
    )


def default_sigint() -> None:
    """``preexec_fn`` for a child that the test stops with SIGINT: a shell that starts jobs in
    the background (``cmd &``, as some CI launchers do) leaves SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler, so the child would never see the Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
