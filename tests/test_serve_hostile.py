"""`aha serve` under hostile clients: it stays up and its memory stays bounded.

Bad JSON, wrong types, values out of range, a 5 MB prompt, a 9 MB body, unknown paths,
clients that hang up mid-stream and 200 connections at once each get an OpenAI-shaped 4xx
(or a 429), never a 500 or a dropped server. Loopback only (127.0.0.1); every loop of
requests is bounded in count and in time.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from ahamoment.models import save_model
from test_serve import KEY, USER, client, make_service, post, serving, tagged_model  # noqa: F401
from tests_support import default_sigint, free_port, wait_healthy

openai = pytest.importorskip("openai")

BIG_PROMPT = "12+" * (5_000_000 // 3)  # 5 MB of text


@pytest.fixture(scope="module")
def server(tagged_model, tiny_tokenizer):  # noqa: F811
    service = make_service(tagged_model, tiny_tokenizer, max_inflight=8)
    with serving(service) as url:
        yield service, url


def _shaped(status: int, raw: bytes) -> dict:
    """The OpenAI error shape: {"error": {message, type, param, code}}."""
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")
    return err


CHAT = {"model": "tiny", "messages": USER, "max_tokens": 4}
HOSTILE = [
    # (body, status, param)
    (b"", 400, None),
    (b"\xff\xfe\x00", 400, None),
    (b"[" * 100_000, 400, None),  # nesting deeper than the JSON parser goes
    (b'{"model": "tiny", "messages": NaN}', 400, "messages"),
    (b"null", 400, None),
    ({**CHAT, "messages": "hi"}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "hacker", "content": "x"}]}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": 42}]}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages"),
    ({**CHAT, "n": "3"}, 400, "n"),
    ({**CHAT, "n": 0}, 400, "n"),
    ({**CHAT, "n": 10**9}, 400, "n"),
    ({**CHAT, "n": 1.5}, 400, "n"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": True}, 400, "max_tokens"),
    ({**CHAT, "temperature": -0.1}, 400, "temperature"),
    ({**CHAT, "temperature": [1]}, 400, "temperature"),
    ({**CHAT, "top_p": 0}, 400, "top_p"),
    ({**CHAT, "top_p": 1.01}, 400, "top_p"),
    ({**CHAT, "top_p": None}, 400, "top_p"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', 400, "top_p"),
    ({**CHAT, "stop": [1, 2]}, 400, "stop"),
    ({**CHAT, "stream_options": 5, "stream": True}, 400, "stream_options"),
    ({**CHAT, "model": ["tiny"]}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": BIG_PROMPT}]}, 400, "messages"),
]  # fmt: skip


@pytest.mark.parametrize("body,status,param", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_get_openai_shaped_4xx(server, body, status, param):
    service, url = server
    t0 = time.monotonic()
    got, raw = post(url + "/v1/chat/completions", body)
    assert got == status and _shaped(got, raw)["param"] == param
    assert time.monotonic() - t0 < 10  # the 5 MB prompt too: refused before it is tokenized


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "tiny", "prompt": [1, "a"]}, "prompt"),
        ({"model": "tiny", "prompt": [True]}, "prompt"),
        ({"model": "tiny", "prompt": [10**12]}, "prompt"),
        ({"model": "tiny", "prompt": "1+1", "stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"model": "tiny", "prompt": "1+1", "stop_token_ids": 7}, "stop_token_ids"),
        ({"model": "tiny", "prompt": BIG_PROMPT}, "prompt"),
    ],
)
def test_hostile_completions(server, body, param):
    _, url = server
    got, raw = post(url + "/v1/completions", body)
    assert got == 400 and _shaped(got, raw)["param"] == param


def test_a_body_over_the_limit_is_a_413_read_no_further(server):
    service, url = server
    host, port = url.removeprefix("http://").split(":")
    # only the headers of a 9 MB body: the answer comes without the body ever being sent
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + f"Content-Length: {service.max_request_bytes + 1}\r\n\r\n".encode()
        )
        s.sendall(b"{" * 1000)
        reply = b""
        while not re.search(rb"\r\n\r\n.*\}\}$", reply, re.S):  # the whole error body
            part = s.recv(65536)
            assert part, reply
            reply += part
    head, _, raw = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and _shaped(413, raw)["code"] == "too_large"
    got, raw = post(url + "/v1/chat/completions", b"x" * (service.max_request_bytes // 2))
    assert got == 400  # under the limit: read, and refused as not JSON


def test_unknown_paths_and_methods_are_openai_shaped(server):
    _, url = server
    got, raw = post(url + "/v1/embeddings", CHAT)
    assert got == 404 and "/v1/embeddings" in _shaped(got, raw)["message"]
    try:
        urllib.request.urlopen(url + "/v1/chat/completions", timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 405 and _shaped(405, e.read())


def test_the_openai_client_sees_its_own_error_types(server):
    _, url = server
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=USER, top_p=0)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": BIG_PROMPT}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-9", messages=USER)
    assert c.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")


def _stream_then_hang_up(url: str, read: int) -> None:
    """Start a streamed chat, read ``read`` bytes of it, and close the socket."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**CHAT, "max_tokens": 32, "stream": True, "n": 2}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while len(got) < read:
            part = s.recv(read - len(got))
            if not part:
                break
            got += part


def test_clients_that_hang_up_mid_stream_are_released(server):
    service, url = server
    for i in range(20):
        _stream_then_hang_up(url, read=[0, 1, 200, 400][i % 4])
    deadline = time.monotonic() + 60
    while service.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.inflight == 0  # every abandoned request finished decoding and was released
    assert client(url).chat.completions.create(**CHAT).choices


# --- the real CLI: 200 connections at once, RSS before and after --------------------------------
def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _burst(port: int, n: int) -> dict[int, int]:
    """``n`` connections opened at once, each sending one request; status -> count."""
    body = json.dumps(CHAT).encode()
    head = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    go = threading.Barrier(n, timeout=60)

    def one(_: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.connect()
            go.wait()  # every connection is open before any request is sent
            conn.request("POST", "/v1/chat/completions", body, head)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                _shaped(resp.status, raw)
            return resp.status
        finally:
            conn.close()

    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(one, range(n)))
    return {s: statuses.count(s) for s in set(statuses)}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_aha_serve_survives_hostile_clients_with_bounded_memory(
    tiny_model, tiny_tokenizer, tmp_path
):
    model_dir = tmp_path / "tiny"
    save_model(tiny_model, tiny_tokenizer, model_dir)
    port = free_port()
    cmd = [sys.executable, "-m", "ahamoment.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--threads", "1", "--max-inflight", "32", "--max-tokens", "16"]  # fmt: skip
    env = os.environ | {"AHA_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, preexec_fn=default_sigint)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=90)
        c = client(url)
        warm = {**CHAT, "model": "tiny"}
        for _ in range(2):  # warm up: the first bursts allocate what later ones reuse
            _burst(port, 50)
            for body, *_ in HOSTILE[:8]:
                post(url + "/v1/chat/completions", body)
        before = _rss_kb(proc.pid)
        statuses = _burst(port, 200)
        assert set(statuses) <= {200, 429} and statuses.get(200, 0) >= 32, statuses
        assert statuses.get(429, 0) > 0  # more than max_inflight at once: turned away, not queued
        for body, status, _ in HOSTILE:  # then the hostile bodies, the 5 MB prompt among them
            assert post(url + "/v1/chat/completions", body)[0] == status
        for i in range(10):
            _stream_then_hang_up(url, read=[1, 300][i % 2])
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=USER, temperature=-1)
        statuses = _burst(port, 200)
        assert set(statuses) <= {200, 429}, statuses
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        time.sleep(1.0)  # requests of the clients that hung up finish decoding
        after = _rss_kb(proc.pid)
        print(f"aha serve RSS: {before} kB before the 200-connection bursts, {after} kB after")
        assert after <= 1.2 * before, (before, after)
        assert c.chat.completions.create(**warm).choices
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "server stopped" in out
    assert "Traceback" not in out, out[-3000:]
