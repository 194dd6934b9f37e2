"""`aha serve`: the reasoning split, the OpenAI-compatible API, auth, limits, and no leaks.

Servers run in-process (uvicorn in a background thread on a free loopback port) over the tiny
model, with its lm_head given a bias towards the tags (``tagged_model``) so that completions
close their thinking, answer, and stop within a few dozen tokens, or get cut inside thinking.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ahamoment.models import save_model
from ahamoment.prompts import stop_ids
from ahamoment.rollout import SamplingParams, TorchEngine
from ahamoment.rollout.base import Request
from ahamoment.server import Service, StopFilter, ThinkSplitter, make_app, split_reasoning
from tests_support import default_sigint, free_port, serve_on_loopback, wait_healthy

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-" + "k" * 16
USER = [{"role": "user", "content": "Using the numbers [3, 5, 7], make 15."}]


# --- the split, by hand ---------------------------------------------------------------------
SPLITS = [
    # (completion text, reasoning, content)
    ("<think>3+5=8</think>\n<answer>8</answer>", "3+5=8", "8"),
    (" <think>\n3+5=8\n</think> <answer> 8 </answer>", "3+5=8\n", "8 "),  # leading ws stripped
    ("<think>3+5=8, then 8+7", "3+5=8, then 8+7", ""),  # max_tokens cut inside the thinking
    ("no tags at all", "no tags at all", ""),  # never closed: all reasoning, content empty
    ("</think>42", "", "42"),  # template that opened <think> in the prompt
    ("<think>a</think>b</think><answer>c", "a", "b</think>c"),  # only the first close counts
    ("<think>a</thi", "a</thi", ""),  # an unfinished tag at the very end is plain text
    ("<think>x<answer>y</answer></think>z", "x<answer>y</answer>", "z"),  # tags inside thinking
]


@pytest.mark.parametrize("text,reasoning,content", SPLITS)
def test_split_by_hand(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    assert split_reasoning(text, keep_reasoning=False) == ("", content)


@pytest.mark.parametrize("text", [t for t, _, _ in SPLITS])
def test_streamed_split_equals_the_whole_for_any_chunking(text):
    rng = random.Random(0)
    whole = split_reasoning(text)
    for trial in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(trial, len(text) - 1)))
        if trial == 0:
            cuts = list(range(1, len(text)))  # one character at a time
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        s, r, c = ThinkSplitter(), "", ""
        for p in pieces:
            dr, dc = s.feed(p)
            assert not dc or not s.thinking  # content only once the thinking is closed
            r, c = r + dr, c + dc
        dr, dc = s.flush()
        assert (r + dr, c + dc) == whole


@pytest.mark.parametrize(
    "pieces,stops,out,hit",
    [
        (["abcST", "OPdef"], ["STOP"], "abc", "STOP"),  # split stop: "ST" held back, then cut
        (["abcST"], ["STOP"], "abcST", None),  # never completed: flushed at the end
        (["x1y", "2"], ["2", "1y"], "x", "1y"),  # the earliest match wins
        (["abc"], [], "abc", None),
    ],
)
def test_stop_filter(pieces, stops, out, hit):
    f = StopFilter(stops)
    got = "".join(f.feed(p) for p in pieces) + f.flush()
    assert (got, f.hit) == (out, hit)


# --- servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tagged_model(tiny_model, tiny_tokenizer):
    """The tiny model with logit biases: </think> +3, </answer> +2, EOS +1 (its random logits
    are about 0, so each step picks </think> with p ~ e^3 / (300 + e^3) ~ 6%)."""
    model = copy.deepcopy(tiny_model)
    emb = model.model.embed_tokens.weight
    head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=True)
    head.weight = emb
    with torch.no_grad():
        head.bias.zero_()
        for token, b in (("</think>", 3.0), ("</answer>", 2.0), (tiny_tokenizer.eos_token, 1.0)):
            head.bias[tiny_tokenizer.convert_tokens_to_ids(token)] = b
    model.lm_head = head
    return model.eval()


def serving(service: Service, log_level: str = "warning"):
    return serve_on_loopback(make_app(service), log_level)


def make_service(model, tokenizer, **kw) -> Service:
    opts = dict(name="tiny", api_key=KEY, max_tokens=64, max_n=4, batch_wait_ms=20.0) | kw
    return Service(model, tokenizer, **opts)


@pytest.fixture(scope="module")
def visible(tagged_model, tiny_tokenizer):
    service = make_service(tagged_model, tiny_tokenizer)
    with serving(service) as url:
        yield service, url


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, body: dict | bytes, key: str | None = KEY) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def reference(model, tokenizer, service: Service, max_tokens: int) -> tuple[str, str, int]:
    """Greedy (reasoning, content, tokens) from the torch engine directly, split by hand."""
    prompt = service.chat_prompt({"messages": USER})
    params = SamplingParams(0.0, max_new_tokens=max_tokens, stop_ids=stop_ids(tokenizer))
    [[c]] = TorchEngine(model, tokenizer).generate([Request(prompt, params)])
    text = tokenizer.decode([t for t in c.ids if t not in service.hidden_ids])
    return *split_reasoning(text), len(c.ids)


def test_chat_plain_and_streamed_match_the_engine(visible, tagged_model, tiny_tokenizer):
    service, url = visible
    want_r, want_c, n_tok = reference(tagged_model, tiny_tokenizer, service, 40)
    c = client(url)
    assert [m.id for m in c.models.list()] == ["tiny"]
    resp = c.chat.completions.create(model="tiny", messages=USER, max_tokens=40, temperature=0)
    msg = resp.choices[0].message
    assert (msg.reasoning_content, msg.content) == (want_r, want_c)
    assert resp.usage.completion_tokens == n_tok
    assert 0 < resp.usage.completion_tokens_details.reasoning_tokens <= n_tok

    stream = c.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    r = ct = ""
    finish, usage = None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            r += getattr(ch.delta, "reasoning_content", None) or ""
            ct += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert (r, ct) == (want_r, want_c)
    assert finish == resp.choices[0].finish_reason
    assert usage.completion_tokens_details.reasoning_tokens == (
        resp.usage.completion_tokens_details.reasoning_tokens
    )


def test_sampled_n_logprobs_and_stop(visible):
    _, url = visible
    resp = client(url).chat.completions.create(
        model="tiny", messages=USER, max_tokens=48, n=3, logprobs=True, stop=["+"]
    )
    assert len(resp.choices) == 3
    for ch in resp.choices:
        assert "+" not in ch.message.content  # stop strings are cut, as in the OpenAI API
        assert ch.finish_reason in ("stop", "length")
    # log-probs cover the content tokens only: every token after the one closing the thinking
    u = resp.usage
    n_content = u.completion_tokens - u.completion_tokens_details.reasoning_tokens
    assert sum(len(ch.logprobs.content) for ch in resp.choices) == n_content


def test_auth_failures(visible):
    _, url = visible
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, "wrong-key").chat.completions.create(model="tiny", messages=USER)
    assert e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, KEY + "x").models.list()
    status, raw = post(url + "/v1/chat/completions", {"model": "tiny", "messages": USER}, key=None)
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(url + "/health") as r:  # health needs no key
        assert json.loads(r.read()) == {"status": "ok"}


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        ({"model": "gpt-9", "messages": USER}, 404, "model"),
        ({"model": "tiny", "messages": USER, "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "tiny", "messages": USER, "n": 5}, 400, "n"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "1+" * 200}]}, 400, "messages"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ],
)
def test_bad_requests_are_clear_4xx(visible, body, status, param):
    _, url = visible
    got, raw = post(url + "/v1/chat/completions", body)
    err = json.loads(raw)["error"]
    assert got == status and err["param"] == param and err["message"]
    assert err["type"] == "invalid_request_error"


def test_prompt_over_the_context_names_the_lengths(visible):
    _, url = visible
    status, raw = post(
        url + "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "1+" * 200}]},
    )
    assert json.loads(raw)["error"]["code"] == "context_length_exceeded"
    assert "512" in json.loads(raw)["error"]["message"]  # the tiny model's context


def test_overload_is_a_429_not_a_hang(visible):
    service, url = visible
    service.inflight += service.max_inflight  # as if that many were decoding
    try:
        with pytest.raises(openai.RateLimitError):
            client(url).chat.completions.create(model="tiny", messages=USER, max_tokens=4)
    finally:
        service.inflight -= service.max_inflight
    resp = client(url).chat.completions.create(model="tiny", messages=USER, max_tokens=4)
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_share_a_batch(visible):
    service, url = visible
    before = len(service.batcher.batch_rows)
    c = client(url)
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda _: c.chat.completions.create(model="tiny", messages=USER, max_tokens=24),
                range(8),
            )
        )
    batches = service.batcher.batch_rows[before:]
    assert sum(batches) == 8 and max(batches) > 1
    assert service.inflight == 0  # every admitted request was released


def test_completions_endpoint_serves_aha_eval(visible, tagged_model, tiny_tokenizer):
    from ahamoment.rollout.openai_engine import OpenAIEngine, TextRequest

    service, url = visible
    engine = OpenAIEngine(None, base_url=url + "/v1", api_key=KEY)
    params = SamplingParams(0.0, max_new_tokens=30, stop=("</answer>",))
    prompt = tiny_tokenizer.decode(service.chat_prompt({"messages": USER}))
    [[got]] = engine.generate([TextRequest(prompt, params)])
    ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    local = dict(stop_ids=stop_ids(tiny_tokenizer), stop=("</answer>",), max_new_tokens=30)
    [[want]] = TorchEngine(tagged_model, tiny_tokenizer).generate(
        [Request(ids, SamplingParams(0.0, **local))]
    )
    assert got.text == tiny_tokenizer.decode([t for t in want.ids if t not in service.hidden_ids])
    assert got.finish_reason == want.finish_reason and len(got.logprobs) == len(want.ids)


# --- hidden reasoning: the leak test --------------------------------------------------------
class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + repr(record.args) + str(record.exc_info))


def varied_requests(rng: random.Random, canary: str, count: int) -> list[tuple[str, object]]:
    reqs: list[tuple[str, object]] = []
    for i in range(count):
        body: dict = {"model": "tiny", "messages": list(USER)}
        if i % 7 == 3:
            body["messages"] = [
                {"role": "system", "content": "be brief"},
                *USER,
                {"role": "assistant", "content": "<think>hm</think><answer>15</answer>"},
                {"role": "user", "content": [{"type": "text", "text": "And make 8?"}]},
            ]
        body["stream"] = rng.random() < 0.5
        if body["stream"] and rng.random() < 0.7:
            body["stream_options"] = {"include_usage": True}
        body["n"] = rng.choice([1, 1, 2, 3])
        body["max_tokens"] = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 64])  # small ones cut thinking
        body["temperature"] = rng.choice([0, 0.7, 1.0, 1.5])
        if rng.random() < 0.5:
            body["logprobs"] = True
        if rng.random() < 0.4:
            body["stop"] = rng.choice([["+"], ["1", "2"], [canary[:4]], [canary[-5:], "="], "<"])
        kind = i % 20
        if kind == 17:  # errors: over the cap, n over the cap, unknown model, bad JSON
            body["max_tokens"] = 10_000
        elif kind == 18:
            body["n"] = 99
        elif kind == 15:
            body["model"] = "gpt-9"  # an unknown model
        elif kind == 19:
            reqs.append(("/v1/chat/completions", rng.choice([b"{oops", b"[]"])))
            continue
        elif kind == 16:
            reqs.append(("/v1/completions", {"model": "tiny", "prompt": "1+1", "max_tokens": 8}))
            continue
        reqs.append(("/v1/chat/completions", body))
    return reqs


def test_hidden_reasoning_never_leaves_the_server(tagged_model, tiny_tokenizer, capfd):
    canary = "CANARY" + secrets.token_hex(8)
    rng = random.Random(1)
    reqs = varied_requests(rng, canary, 200)
    # positive control: with visible reasoning the same hook does show up
    service = make_service(tagged_model, tiny_tokenizer, reasoning="visible")
    service.inject_reasoning = canary
    with serving(service) as url:
        _, plain = post(url + "/v1/chat/completions", {"model": "tiny", "messages": USER})
        _, streamed = post(url + "/v1/chat/completions", reqs[0][1] | {"stream": True})
    assert canary in json.loads(plain)["choices"][0]["message"]["reasoning_content"]
    assert canary in streamed.decode()

    service = make_service(tagged_model, tiny_tokenizer, reasoning="hidden", max_inflight=256)
    service.inject_reasoning = canary
    capture = Capture()
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "ahamoment", "ahamoment.serve")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        with serving(service, log_level="debug") as url:
            for lg in loggers:  # after uvicorn's own logging config, which resets its handlers
                lg.addHandler(capture)
                lg.setLevel(logging.DEBUG)
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda r: (r, post(url + r[0], r[1])), reqs))
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(capture)
            lg.setLevel(level)
    out, err = capfd.readouterr()

    statuses: dict[int, int] = {}
    reasoning_tokens = content_chars = streams = 0
    for (path, body), (status, raw) in results:
        statuses[status] = statuses.get(status, 0) + 1
        text = raw.decode()
        assert canary not in text and "reasoning_content" not in text, (path, body)
        if status != 200:
            assert json.loads(raw)["error"]["message"]
            continue
        if isinstance(body, dict) and body.get("stream"):
            streams += 1
            assert text.rstrip().endswith("data: [DONE]")
            for line in text.splitlines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for ch in chunk["choices"]:
                        content_chars += len(ch["delta"].get("content") or "")
                    usage = chunk.get("usage") or {}
                    details = usage.get("completion_tokens_details") or {}
                    reasoning_tokens += details.get("reasoning_tokens", 0)
        else:
            resp = json.loads(raw)
            reasoning_tokens += resp["usage"]["completion_tokens_details"]["reasoning_tokens"]
            content_chars += sum(len(c["message"]["content"]) for c in resp["choices"])
    assert canary not in "\n".join(capture.lines) + out + err
    assert any("POST /v1/chat/completions" in line for line in capture.lines)  # logs captured
    # the test is not vacuous: requests succeeded, streamed, thought and answered; errors too
    assert statuses[200] > 140 and statuses[400] >= 20 and statuses[403] + statuses[404] >= 20
    assert streams > 50 and reasoning_tokens > 500 and content_chars > 100
    assert service.inflight == 0


# --- the real CLI ---------------------------------------------------------------------------
@pytest.mark.slow
def test_aha_serve_cli_serves_and_stops_on_ctrl_c(tiny_model, tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "tiny-model"
    save_model(tiny_model, tiny_tokenizer, model_dir)
    port = free_port()
    env = os.environ | {"AHA_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ahamoment.cli", "serve", "--model", str(model_dir)]
    cmd += ["--port", str(port), "--threads", "1", "--reasoning", "hidden"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=default_sigint,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout=60)
        resp = client(url).chat.completions.create(model="tiny-model", messages=USER, max_tokens=8)
        assert resp.usage.completion_tokens_details.reasoning_tokens >= 0
        assert not hasattr(resp.choices[0].message, "reasoning_content")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "server stopped" in out
