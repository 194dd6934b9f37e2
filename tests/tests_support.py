"""Helpers importable from test modules (tests/ is on sys.path under pytest's rootdir)."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ahamoment.prompts import r1_zero_prompt

GQA_VOCAB = 64
# 2 layers, 4 query heads over 2 key/value heads (grouped-query attention), float32.
# initializer_range=0.3 spreads the logits, so greedy outputs wander instead of looping and
# next-token distributions are far from uniform: comparisons against them can fail.
_GQA_SHAPE = dict(
    vocab_size=GQA_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.3,
)


def gqa_llama() -> LlamaForCausalLM:
    """A tiny grouped-query Llama, seed 0, in eval mode."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_GQA_SHAPE)).eval()


def gqa_qwen2() -> Qwen2ForCausalLM:
    """A tiny grouped-query Qwen2 (q/k/v biases, untied head), seed 1, in eval mode."""
    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(**_GQA_SHAPE, tie_word_embeddings=False)).eval()


def wait_healthy(url: str, proc, timeout: float) -> None:
    """Poll ``url``/health until it answers; fail if ``proc`` (an `aha serve` Popen) exits or
    ``timeout`` seconds pass first (``aha launch``'s own wait)."""
    from ahamoment.stages.launch import wait_healthy as wait

    wait(url, proc, timeout)


def free_port() -> int:
    """A 127.0.0.1 port free now, for a server started in a subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
