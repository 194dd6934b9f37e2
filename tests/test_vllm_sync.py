"""``rollout/vllm_sync``: the control plane of the vLLM weight push, without vLLM or a GPU.

The HTTP session and the NCCL link are fakes that block the way the real peers do: the link's
rendezvous waits for the server's init call, and its broadcast waits for the server's
``/update_weights`` call (whose workers receive inside it), so a push that made these calls
one after the other instead of concurrently would fail the wait instead of passing.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ahamoment.rollout.vllm_sync import (
    SERVER_HINT,
    UrllibSession,
    VLLMWeightSync,
    WeightSyncError,
    base_url,
    init_request,
    make_vllm_sync,
    update_request,
)

WAIT_S = 5.0  # a fake peer gives up after this long: a missing concurrent call fails, not hangs


def tiny_llama_state() -> dict[str, torch.Tensor]:
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).state_dict()


# head_dim = hidden / heads = 16 / 2 = 8, so k_proj and v_proj have 1 kv head * 8 = 8 rows;
# the MLP is 16 -> 32 -> 16; embeddings and lm_head are (vocab 32, hidden 16). inv_freq is a
# non-persistent buffer, so it is not in the state dict.
TINY_LLAMA = [
    ("model.embed_tokens.weight", [32, 16]),
    ("model.layers.0.self_attn.q_proj.weight", [16, 16]),
    ("model.layers.0.self_attn.k_proj.weight", [8, 16]),
    ("model.layers.0.self_attn.v_proj.weight", [8, 16]),
    ("model.layers.0.self_attn.o_proj.weight", [16, 16]),
    ("model.layers.0.mlp.gate_proj.weight", [32, 16]),
    ("model.layers.0.mlp.up_proj.weight", [32, 16]),
    ("model.layers.0.mlp.down_proj.weight", [16, 32]),
    ("model.layers.0.input_layernorm.weight", [16]),
    ("model.layers.0.post_attention_layernorm.weight", [16]),
    ("model.norm.weight", [16]),
    ("lm_head.weight", [32, 16]),
]


def wait_for(event: threading.Event, failure: str) -> None:
    """Wait for the peer's side of a rendezvous, then reset it for the next one."""
    if not event.wait(WAIT_S):
        raise AssertionError(failure)
    event.clear()


class FakeResponse:
    def __init__(self, status_code: int, payload: object = None, text: str = "") -> None:
        self.status_code = status_code
        self.payload = payload
        self.text = text or json.dumps(payload)

    def json(self) -> object:
        return self.payload


class FakeServers:
    """A session for any number of fake vLLM servers, keyed by root URL; every call and every
    link event goes to one shared log of (what, url-or-port, body-or-detail)."""

    def __init__(self, world_sizes: dict[str, int], fail: dict[str, FakeResponse] | None = None):
        self.world_sizes = world_sizes
        self.fail = fail or {}  # full URL -> the response it gets instead of a 200
        self.log: list[tuple] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.init_called = threading.Event()
        self.joined = threading.Event()
        self.update_called = threading.Event()
        self.sent = threading.Event()

    def _record(self, method: str, url: str, body: object, headers: dict[str, str]) -> None:
        with self.lock:
            self.log.append((method, url, body))
            self.headers.append(dict(headers))

    def get(self, url: str, *, headers: dict[str, str], timeout: float) -> FakeResponse:
        self._record("GET", url, None, headers)
        if url in self.fail:
            return self.fail[url]
        root, path = url.rsplit("/", 1)
        assert path == "get_world_size", url
        return FakeResponse(200, {"world_size": self.world_sizes[root]})

    def post(
        self, url: str, *, json: object, headers: dict[str, str], timeout: float
    ) -> FakeResponse:
        assert timeout == 600.0
        self._record("POST", url, json, headers)
        if url in self.fail:  # rejected before its workers enter NCCL
            if url.endswith("/update_weights"):
                self.update_called.set()
            return self.fail[url]
        # like vLLM, the init and update calls return only once the trainer's side is done
        if url.endswith("/init_weight_transfer_engine"):
            self.init_called.set()
            wait_for(self.joined, "init call without a concurrent trainer rendezvous")
        if url.endswith("/update_weights"):
            self.update_called.set()
            wait_for(self.sent, "update_weights call without a concurrent broadcast")
        return FakeResponse(200, {"message": "ok"})


class FakeLink:
    def __init__(self, servers: FakeServers, port: int) -> None:
        self.servers = servers
        self.master_address = "10.0.0.7"
        self.master_port = port

    def open(self, world_size: int) -> None:
        # NCCL rendezvous: returns only once the server's workers join, inside its init call
        wait_for(self.servers.init_called, "rendezvous without a concurrent init call")
        with self.servers.lock:
            self.servers.log.append(("open", self.master_port, world_size))
        self.servers.joined.set()

    def send(self, pairs) -> None:
        # the workers receive inside their /update_weights call: it must already be under way
        wait_for(self.servers.update_called, "broadcast without a concurrent update_weights call")
        sent = [(name, t.dtype, list(t.shape)) for name, t in pairs]
        with self.servers.lock:
            self.servers.log.append(("send", self.master_port, sent))
        self.servers.sent.set()

    def close(self) -> None:
        with self.servers.lock:
            self.servers.log.append(("close", self.master_port, None))


def fake_sync(urls, servers: FakeServers, api_key: str = "") -> VLLMWeightSync:
    sync = VLLMWeightSync(urls, api_key=api_key)
    ports = iter(range(29500, 29600))
    sync.session = servers
    sync.new_link = lambda: FakeLink(servers, next(ports))
    return sync


def small_state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}


def test_update_request_lists_every_tensor_in_state_dict_order():
    request = update_request(tiny_llama_state())
    assert (request.method, request.path) == ("POST", "/update_weights")
    # exactly vLLM 0.32's NCCLWeightTransferUpdateInfo fields: its workers reject other keys
    assert request.body == {
        "update_info": {
            "names": [name for name, _ in TINY_LLAMA],
            "dtype_names": ["bfloat16"] * 12,
            "shapes": [shape for _, shape in TINY_LLAMA],
        }
    }
    assert json.loads(json.dumps(request.body)) == request.body  # it goes over HTTP as is


def test_update_request_keeps_each_tensors_own_dtype_and_rejects_empty_state():
    state = {"a": torch.zeros(1, dtype=torch.float32), "b": torch.zeros(2, 2, dtype=torch.int64)}
    assert update_request(state).body["update_info"]["dtype_names"] == ["float32", "int64"]
    with pytest.raises(ValueError, match="empty state dict"):
        update_request({})


def test_init_request_payload():
    request = init_request("10.0.0.7", 29500, 3)
    assert (request.method, request.path) == ("POST", "/init_weight_transfer_engine")
    assert request.body == {
        "init_info": {
            "master_address": "10.0.0.7",
            "master_port": 29500,
            "rank_offset": 1,
            "world_size": 3,
            "packed": True,
            "packed_buffer_size_bytes": 1073741824,  # 1 GiB, vLLM 0.32's default
            "packed_num_buffers": 2,
        }
    }


def test_push_makes_the_control_calls_in_order_and_initialises_once():
    a = "http://trainer-peer:8000"
    servers = FakeServers({a: 2})  # 2 workers (say TP=2): world = 1 trainer + 2 = 3
    sync = fake_sync([a + "/v1/"], servers)  # an OpenAI base URL: the routes live at the root
    state = small_state()
    sync.push(state, 1)
    sync.push(state, 2)
    sent = [("w", torch.float32, [2, 3]), ("b", torch.bfloat16, [3])]

    def one_push(version: int) -> list[tuple]:
        return [
            ("POST", a + "/pause?mode=wait", None),
            ("POST", a + "/start_weight_update", None),
            ("POST", a + "/update_weights", update_request(state).body),
            ("send", 29500, sent),
            ("POST", a + "/finish_weight_update", {"weight_version": str(version)}),
            ("POST", a + "/resume", None),
        ]

    assert servers.log == [
        ("GET", a + "/get_world_size", None),
        ("POST", a + "/init_weight_transfer_engine", init_request("10.0.0.7", 29500, 3).body),
        ("open", 29500, 3),
        *one_push(1),
        *one_push(2),
    ]
    assert sync.version == 2

    servers.log.clear()
    sync.close()
    assert servers.log == [
        ("POST", a + "/shutdown_weight_transfer_engine", None),
        ("close", 29500, None),
    ]
    sync.close()  # nothing left to release
    assert len(servers.log) == 2


def test_one_nccl_group_per_server_each_sized_by_its_own_workers():
    a, b = "http://a:8000", "http://b:8001"
    servers = FakeServers({a: 1, b: 4})
    sync = fake_sync([a, b], servers)
    sync.push(small_state(), 7)
    joins = [entry for entry in servers.log if entry[0] == "open"]
    assert joins == [("open", 29500, 2), ("open", 29501, 5)]  # worlds 1 + 1 and 1 + 4
    inits = [body for _, url, body in servers.log if url == b + "/init_weight_transfer_engine"]
    assert [(i["init_info"]["master_port"], i["init_info"]["world_size"]) for i in inits] == [
        (29501, 5)
    ]
    finishes = [url for _, url, _ in servers.log if str(url).endswith("/finish_weight_update")]
    assert finishes == [a + "/finish_weight_update", b + "/finish_weight_update"]


def test_api_key_is_sent_as_a_bearer_token_on_every_call():
    a = "http://a:8000"
    with_key = FakeServers({a: 1})
    fake_sync([a], with_key, api_key="sk-test").push(small_state(), 1)
    assert len(with_key.headers) == 7  # world size, init, pause, start, update, finish, resume
    assert all(h == {"Authorization": "Bearer sk-test"} for h in with_key.headers)

    without_key = FakeServers({a: 1})
    fake_sync([a], without_key).push(small_state(), 1)
    assert without_key.headers == [{}] * 7


def test_404_is_a_one_line_error_naming_the_url_and_what_to_set():
    a = "http://a:8000"
    servers = FakeServers({a: 1}, fail={a + "/get_world_size": FakeResponse(404, text="")})
    sync = fake_sync([a], servers)
    with pytest.raises(WeightSyncError) as info:
        sync.push(small_state(), 1)
    message = str(info.value)
    assert message == (
        "http://a:8000/get_world_size answered 404: start vllm serve with "
        """VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config '{"backend": "nccl"}'"""
    )
    assert SERVER_HINT in message and "\n" not in message
    assert servers.log == [("GET", a + "/get_world_size", None)]  # no NCCL group was opened
    assert sync.version is None


def test_a_rejected_update_stops_the_push_before_finish_and_resume():
    a = "http://a:8000"
    refused = FakeResponse(500, text="Internal\nServer Error")
    servers = FakeServers({a: 1}, fail={a + "/update_weights": refused})
    sync = fake_sync([a], servers)
    with pytest.raises(WeightSyncError) as info:
        sync.push(small_state(), 1)
    assert str(info.value).startswith(
        "http://a:8000/update_weights answered 500: Internal Server Error (if its log says"
    )
    called = [url.removeprefix(a) for _, url, _ in servers.log if isinstance(url, str)]
    assert called[-3:] == ["/pause?mode=wait", "/start_weight_update", "/update_weights"]
    assert sync.version is None


def test_urls_and_factory():
    assert base_url("http://h:8000/v1/") == "http://h:8000"
    assert base_url(" https://h/ ") == "https://h"
    with pytest.raises(ValueError, match="http://"):
        base_url("h:8000")
    with pytest.raises(ValueError, match="list of server URLs"):
        VLLMWeightSync("http://h:8000")  # a bare string would iterate its characters
    sync = make_vllm_sync("http://a:8000,http://b:8000/v1", "sk")
    assert (sync.urls, sync.api_key, sync.device) == (
        ["http://a:8000", "http://b:8000"],
        "sk",
        "cuda",
    )


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = {
            "body": json.loads(body) if body else None,
            "auth": self.headers.get("Authorization"),
            "type": self.headers.get("Content-Type"),
        }
        status = 404 if self.path == "/missing" else 200
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_default_session_returns_statuses_instead_of_raising():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # loopback only
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        root = f"http://127.0.0.1:{server.server_address[1]}"
        session = UrllibSession()
        ok = session.post(
            root + "/x", json={"a": 1}, headers={"Authorization": "Bearer k"}, timeout=5
        )
        assert ok.status_code == 200
        assert ok.json() == {"body": {"a": 1}, "auth": "Bearer k", "type": "application/json"}
        empty = session.post(root + "/x", json=None, headers={}, timeout=5)
        assert empty.json() == {"body": None, "auth": None, "type": None}
        missing = session.post(root + "/missing", json=None, headers={}, timeout=5)
        assert missing.status_code == 404
    finally:
        server.shutdown()
        server.server_close()
