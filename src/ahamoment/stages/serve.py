"""`aha serve`: an OpenAI-compatible chat endpoint for a model, reasoning split out.

Loads the model (default: the embedded default, built by `aha pretrain` on first use), starts
the decoding thread that batches requests, and serves the app of ``ahamoment.server`` with
uvicorn until Ctrl-C, which stops taking connections, lets requests in flight finish, then
stops the decoding thread.

    aha serve --model runs/zero/final --port 8000 --reasoning hidden   # key from $AHA_API_KEY

Chat responses carry the chain of thought in ``reasoning_content`` and the answer in
``content`` (the DeepSeek API's fields); ``--reasoning hidden`` keeps the reasoning on the
server and reports only its token count. See ``ahamoment/server.py`` for the split, the
batching and the limits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ahamoment.base_models import ensure_base_model
from ahamoment.models import load_model, load_tokenizer, set_threads
from ahamoment.server import Service, make_app
from ahamoment.server_protocol import API_KEY_ENV, WEIGHTS_KEY_ENV

DEFAULT_NAME = "ahamoment-default"


@dataclass
class ServeConfig:
    model: str = ""
    """Local HF causal-LM directory. Empty: the embedded default, built by `aha pretrain` on first use."""
    pretrain_recipe: str = ""
    """With no --model: YAML recipe for the embedded default model built on first use."""
    task: str = "countdown"
    """With no --model: the task whose embedded default model is served."""
    name: str = ""
    """Model id served (clients pass it as `model`); empty: the model directory's name, or 'ahamoment-default'."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface; set an API key then)."""
    port: int = 8000
    """TCP port."""
    api_key: str = ""
    """Bearer key clients must send; empty: $AHA_API_KEY; neither: no authentication."""
    reasoning: str = "visible"
    """'visible': the chain of thought goes in reasoning_content; 'hidden': it never leaves the server (only its token count does)."""
    max_tokens: int = 256
    """Largest max_tokens a request may ask for (also the default)."""
    max_n: int = 8
    """Largest n (completions per request)."""
    max_inflight: int = 64
    """Requests admitted at once (waiting or decoding); one more gets a 429."""
    max_batch_rows: int = 64
    """Completions decoded together in one batch (about: a request's n rows stay together)."""
    batch_wait_ms: float = 5.0
    """How long the decoding thread waits for more requests before starting a batch."""
    max_request_bytes: int = 8 << 20
    """Largest request body in bytes; a larger one gets a 413 and is read no further."""
    seed: int = 0
    """Seed of the sampling draws."""
    threads: int = 0
    """torch CPU threads; 0 uses every core this process may run on."""
    weights_key: str = ""
    """Bearer key a trainer sends to push new weights (POST /v1/weights, for `aha zero --rollout-server`); empty: $AHA_WEIGHTS_KEY; neither: weight updates are off."""
    engine: str = "torch"
    """Decoding step: torch (fused, rollout/compiled.py) or torch-eager (plain torch ops)."""
    reference: bool = False
    """Keep a frozen copy of the starting weights and return its log-probs of each completion on request: a trainer's KL reference, computed here instead of in the trainer (`aha launch` sets it)."""

    def __post_init__(self) -> None:
        if self.reasoning not in ("visible", "hidden"):
            raise ValueError(f"reasoning must be 'visible' or 'hidden', got {self.reasoning!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if min(self.max_tokens, self.max_n, self.max_inflight, self.max_batch_rows) < 1:
            raise ValueError("max_tokens, max_n, max_inflight and max_batch_rows must be >= 1")
        if self.max_n > self.max_batch_rows:
            raise ValueError("max_n must be <= max_batch_rows (a request's rows share a batch)")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be >= 0")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be at least 1024")
        if self.engine not in ("torch", "torch-eager"):
            raise ValueError(f"engine must be 'torch' or 'torch-eager', got {self.engine!r}")

    def key(self) -> str:
        return self.api_key or os.environ.get(API_KEY_ENV, "")

    def push_key(self) -> str:
        return self.weights_key or os.environ.get(WEIGHTS_KEY_ENV, "")


def build_service(cfg: ServeConfig, console: Console | None = None) -> Service:
    """Load the model and tokenizer and wrap them in a ``Service`` (not started)."""
    path = ensure_base_model(cfg.model, cfg.task, cfg.pretrain_recipe, cfg.threads, console)
    model, tokenizer = load_model(path), load_tokenizer(path)
    name = cfg.name or (Path(cfg.model).name if cfg.model else DEFAULT_NAME)
    return Service(
        model,
        tokenizer,
        name=name,
        reasoning=cfg.reasoning,
        api_key=cfg.key(),
        max_tokens=cfg.max_tokens,
        max_n=cfg.max_n,
        max_inflight=cfg.max_inflight,
        max_batch_rows=cfg.max_batch_rows,
        batch_wait_ms=cfg.batch_wait_ms,
        seed=cfg.seed,
        max_request_bytes=cfg.max_request_bytes,
        weights_key=cfg.push_key(),
        compile=cfg.engine == "torch",
        reference=cfg.reference,
    )


def serve(cfg: ServeConfig, console: Console | None = None) -> None:
    import uvicorn

    console = console or Console()
    set_threads(cfg.threads)
    service = build_service(cfg, console)
    if not service.api_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] no API key on {cfg.host}: set ${API_KEY_ENV}")
    logging.getLogger("ahamoment").setLevel(logging.INFO)
    console.print(
        f"serving [bold]{service.name}[/] at http://{cfg.host}:{cfg.port}/v1 "
        f"(reasoning {cfg.reasoning}, auth {'on' if service.api_key else 'off'}, weight "
        f"updates {'on' if service.weights_key else 'off'}); Ctrl-C stops"
    )
    server = uvicorn.Server(uvicorn.Config(make_app(service), host=cfg.host, port=cfg.port))
    try:
        server.run()  # SIGINT/SIGTERM: finish requests in flight, then the lifespan stops
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its graceful shutdown
        pass
    console.print("server stopped")


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("serve", argv)


if __name__ == "__main__":
    raise SystemExit(main())
