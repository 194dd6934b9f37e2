"""Push a trainer's weights to running vLLM servers (``vllm serve``) after each optimizer step.

**Untested on a GPU.** This is written against the weight-transfer API of vLLM 0.32.0, the
version our ``vllm`` extra resolves to, read from the 0.32.0 wheel's source (paths below). No
GPU and no vLLM are available here, so only the pure parts (request payloads, the order of the
control calls, errors) are tested, with a fake HTTP session and a fake NCCL link
(``tests/test_vllm_sync.py``). The NCCL data plane has never run.

Start each server in dev mode with the NCCL weight-transfer backend::

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --weight-transfer-config '{"backend": "nccl"}'

Protocol, per server (routes: ``vllm/entrypoints/rl/online/api_router.py``; they are mounted
only when ``VLLM_SERVER_DEV_MODE=1``, so a 404 means dev mode is off):

- once, on the first ``push``: ``GET /get_world_size`` -> ``{"world_size": N}`` (all of the
  server's workers, TP * PP * DP); then ``POST /init_weight_transfer_engine`` with
  ``{"init_info": {...}}`` while the trainer joins the same NCCL group as rank 0. World =
  1 + N, workers from rank 1 (``rank_offset``), as vLLM's ``NCCLTrainerWeightTransferEngine``
  does. The init call and the trainer's join block on each other, so they run concurrently.
- each ``push``: ``POST /pause?mode=wait``, ``POST /start_weight_update``,
  ``POST /update_weights`` with ``{"update_info": {"names", "dtype_names", "shapes"}}``
  *concurrently* with the NCCL broadcast (the server's call returns once its workers have
  received and loaded every tensor), ``POST /finish_weight_update`` with
  ``{"weight_version": "<version>"}``, ``POST /resume``.
- ``close``: ``POST /shutdown_weight_transfer_engine``, then the trainer's communicator is
  destroyed.

Data plane: vLLM's own trainer-side helpers (``vllm/distributed/weight_transfer/``):
``nccl_common.trainer_init`` (a ``PyNcclCommunicator`` over a ``StatelessProcessGroup``) and
``packed_tensor.packed_nccl_broadcast_producer``. The transfer is packed, with vLLM's default
buffers (two of 1 GiB), sent in ``init_info`` so both ends agree.

How this differs from driving vLLM's ``NCCLTrainerWeightTransferEngine`` with its
``HTTPVLLMWeightSyncClient``, which speak the same wire protocol:

- the control calls go through an injectable session (``.get`` / ``.post``), with a bearer
  token when ``api_key`` is set, and a failure is a one-line ``WeightSyncError`` naming the
  URL (vLLM's client raises a bare ``requests`` error and sends no token);
- generation is paused around the update. vLLM 0.32 reloads layerwise: between
  ``start_weight_update`` and ``finish_weight_update`` the layers sit on the meta device, so no
  forward pass may run. ``mode=wait`` lets requests in flight finish on the old weights and
  clears the prefix cache; requests queued meanwhile start on the new weights;
- the state dict is sent as given (names, dtypes, shapes of the HF ``state_dict``; tensors
  are moved to ``device`` one at a time), not read from a module.

Versions. ``finish_weight_update`` records ``version`` as the server's weight version, but the
OpenAI ``/v1`` completions do not carry it (only vLLM's ``/inference/v1/generate`` returns
``weight_versions`` spans), so the caller tracks versions client-side; ``VLLMWeightSync.version``
is the last version every server acknowledged.

Caveats:

- vLLM 0.32's ``--api-key`` does not guard these routes (its middleware guards ``/v1``,
  ``/v2``, ``/inference`` and ``/cohere`` only): the token is sent for a proxy in front, but a
  dev-mode server must never be reachable by anyone who may not overwrite its weights;
- the servers must reach the trainer's address: vLLM's ``get_ip`` (set ``VLLM_HOST_IP`` to
  choose it) and a free port;
- if the server's init call fails, the trainer still waits in the NCCL rendezvous until
  ``StatelessProcessGroup``'s store timeout (300 s in 0.32) before the server's error is raised;
- if the server rejects ``/update_weights`` (its workers never enter the broadcast), the
  trainer's broadcast waits for them forever: NCCL cannot be interrupted from here;
- a failure between pause and resume leaves that server paused, possibly mid-reload, and the
  NCCL group unusable: ``close`` and restart the server.
"""

from __future__ import annotations

import importlib
import json as jsonlib
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

INSTALL_HINT = "pip install 'ahamoment[vllm]'"
SERVER_HINT = (
    "start vllm serve with VLLM_SERVER_DEV_MODE=1 and "
    """--weight-transfer-config '{"backend": "nccl"}'"""
)
PAUSE_MODE = "wait"
"""How ``/pause`` treats requests in flight: "wait" lets them finish on the old weights
("abort" would drop them, "keep" would resume them on the new weights over old KV cache)."""
PACKED_BUFFER_BYTES = 1024**3
"""Bytes per packed broadcast buffer: vLLM 0.32's DEFAULT_PACKED_BUFFER_SIZE_BYTES."""
PACKED_NUM_BUFFERS = 2
"""Packed buffers in flight: vLLM 0.32's DEFAULT_PACKED_NUM_BUFFERS."""


class WeightSyncError(RuntimeError):
    """A control call to a vLLM server failed; the message is one line naming the URL."""


# --- control requests: pure, testable without vLLM ------------------------------------------


@dataclass(frozen=True)
class ControlRequest:
    """One HTTP call of the weight-transfer control plane."""

    method: str
    """GET or POST."""
    path: str
    """Path under the server's root (the routes are not under ``/v1``), query included."""
    body: dict[str, Any] | None = None
    """JSON body, or None for a call without one."""


def dtype_name(dtype: torch.dtype) -> str:
    """vLLM's wire name of a dtype (``torch.bfloat16`` -> "bfloat16"; workers ``getattr(torch,
    name)``)."""
    return str(dtype).removeprefix("torch.")


def world_size_request() -> ControlRequest:
    """How many workers the server has, across TP, PP and DP: ``{"world_size": N}``."""
    return ControlRequest("GET", "/get_world_size")


def init_request(
    master_address: str,
    master_port: int,
    world_size: int,
    *,
    packed_buffer_bytes: int = PACKED_BUFFER_BYTES,
    packed_num_buffers: int = PACKED_NUM_BUFFERS,
) -> ControlRequest:
    """Join the server's workers to the trainer's NCCL group (vLLM 0.32's
    ``NCCLWeightTransferInitInfo``; its workers reject unknown keys)."""
    init_info = {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": 1,  # the trainer is rank 0
        "world_size": world_size,
        "packed": True,
        "packed_buffer_size_bytes": packed_buffer_bytes,
        "packed_num_buffers": packed_num_buffers,
    }
    return ControlRequest("POST", "/init_weight_transfer_engine", {"init_info": init_info})


def pause_request(mode: str = PAUSE_MODE) -> ControlRequest:
    return ControlRequest("POST", f"/pause?mode={mode}")


def start_request() -> ControlRequest:
    return ControlRequest("POST", "/start_weight_update")


def update_request(state: Mapping[str, torch.Tensor]) -> ControlRequest:
    """Every tensor of ``state`` in its order, as vLLM 0.32's ``NCCLWeightTransferUpdateInfo``
    (exactly these three keys: its workers reject unknown ones, such as the ``packed`` that
    older examples sent here)."""
    if not state:
        raise ValueError("cannot push an empty state dict")
    names, dtypes, shapes = [], [], []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        names.append(name)
        dtypes.append(dtype_name(tensor.dtype))
        shapes.append(list(tensor.shape))
    update_info = {"names": names, "dtype_names": dtypes, "shapes": shapes}
    return ControlRequest("POST", "/update_weights", {"update_info": update_info})


def finish_request(version: int) -> ControlRequest:
    return ControlRequest("POST", "/finish_weight_update", {"weight_version": str(version)})


def resume_request() -> ControlRequest:
    return ControlRequest("POST", "/resume")


def shutdown_request() -> ControlRequest:
    return ControlRequest("POST", "/shutdown_weight_transfer_engine")


def base_url(url: str) -> str:
    """The server's root: the routes live there, so an OpenAI base URL's ``/v1`` is dropped."""
    root = url.strip().rstrip("/").removesuffix("/v1")
    if not root.startswith(("http://", "https://")):
        raise ValueError(f"a vLLM server URL starts with http:// or https://, got {url!r}")
    return root


def check_response(url: str, response: Any) -> None:
    """Raise a one-line ``WeightSyncError`` naming ``url`` unless ``response`` is a 2xx."""
    code = int(response.status_code)
    if 200 <= code < 300:
        return
    if code == 404:
        raise WeightSyncError(f"{url} answered 404: {SERVER_HINT}")
    detail = " ".join(str(response.text).split())[:300] or "(empty body)"
    hint = ""
    if code == 500:  # a server without --weight-transfer-config fails here, not with a 404
        hint = f" (if its log says 'Weight transfer not configured': {SERVER_HINT})"
    raise WeightSyncError(f"{url} answered {code}: {detail}{hint}")


# --- transports ------------------------------------------------------------------------------


class Response(Protocol):
    status_code: int
    text: str

    def json(self) -> Any: ...


class Session(Protocol):
    """What the control plane needs of an HTTP client (``httpx.Client`` and
    ``requests.Session`` fit)."""

    def get(self, url: str, *, headers: dict[str, str], timeout: float) -> Response: ...

    def post(self, url: str, *, json: Any, headers: dict[str, str], timeout: float) -> Response: ...


@dataclass(frozen=True)
class UrllibResponse:
    status_code: int
    text: str

    def json(self) -> Any:
        return jsonlib.loads(self.text)


class UrllibSession:
    """The default ``Session``: the standard library, so no HTTP client is a dependency.
    Non-2xx statuses are returned, not raised, as ``httpx`` does."""

    def get(self, url: str, *, headers: dict[str, str], timeout: float) -> UrllibResponse:
        return self._send("GET", url, None, headers, timeout)

    def post(
        self, url: str, *, json: Any, headers: dict[str, str], timeout: float
    ) -> UrllibResponse:
        return self._send("POST", url, json, headers, timeout)

    @staticmethod
    def _send(
        method: str, url: str, body: Any, headers: dict[str, str], timeout: float
    ) -> UrllibResponse:
        data = None if body is None else jsonlib.dumps(body).encode()
        headers = dict(headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return UrllibResponse(reply.status, reply.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as e:
            return UrllibResponse(e.code, e.read().decode("utf-8", "replace"))


class Link(Protocol):
    """The trainer's end of one NCCL group with one server's workers."""

    master_address: str
    master_port: int

    def open(self, world_size: int) -> None:
        """Join the group as rank 0; blocks until every worker has joined."""

    def send(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast every tensor, in order; returns once the broadcasts have completed."""

    def close(self) -> None: ...


def _vllm_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"pushing weights to vLLM servers needs vLLM on the trainer too (for its NCCL "
            f"helpers): {INSTALL_HINT} (CUDA GPUs only)"
        ) from e


class NcclLink:
    """A ``Link`` through vLLM 0.32's trainer-side helpers. Untested on a GPU.

    The rendezvous address is vLLM's ``get_ip()`` (``VLLM_HOST_IP`` overrides it) and the port
    a free one from ``get_open_port()``, both picked here, before the init call names them."""

    def __init__(
        self,
        device: str = "cuda",
        packed_buffer_bytes: int = PACKED_BUFFER_BYTES,
        packed_num_buffers: int = PACKED_NUM_BUFFERS,
    ) -> None:
        network = _vllm_module("vllm.utils.network_utils")
        self.device = torch.device(device)
        self.master_address: str = network.get_ip()
        self.master_port: int = network.get_open_port()
        self.packed_buffer_bytes = packed_buffer_bytes
        self.packed_num_buffers = packed_num_buffers
        self.group: Any = None  # vLLM's PyNcclCommunicator, once open

    def open(self, world_size: int) -> None:
        nccl_common = _vllm_module("vllm.distributed.weight_transfer.nccl_common")
        if self.device.index is not None:  # trainer_init uses the current device
            torch.accelerator.set_device_index(self.device.index)
        rendezvous = {
            "master_address": self.master_address,
            "master_port": self.master_port,
            "world_size": world_size,
        }
        self.group = nccl_common.trainer_init(rendezvous, rank=0)

    def send(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.group is None:
            raise RuntimeError("NcclLink.send before open")
        packed = _vllm_module("vllm.distributed.weight_transfer.packed_tensor")
        packed.packed_nccl_broadcast_producer(
            iterator=self._on_device(pairs),
            group=self.group,
            src=0,
            post_iter_func=lambda pair: pair[1],
            buffer_size_bytes=self.packed_buffer_bytes,
            num_buffers=self.packed_num_buffers,
        )
        # the broadcasts are only enqueued: wait, so the caller may update the weights next
        torch.cuda.current_stream().synchronize()

    def _on_device(
        self, pairs: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in pairs:  # one at a time: a CPU state dict never sits on the GPU whole
            yield name, tensor.detach().to(self.device)

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


def _in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` on a daemon thread: a control call that waits for an NCCL peer which
    never comes must not keep the interpreter from exiting."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name="vllm-sync-control", daemon=True).start()
    return future


# --- the sync --------------------------------------------------------------------------------


class ServerSync:
    """One vLLM server: control calls through ``session``, tensors through a ``Link`` that
    ``new_link`` makes on the first push."""

    def __init__(
        self,
        url: str,
        session: Session,
        new_link: Callable[[], Link],
        *,
        api_key: str = "",
        timeout: float = 600.0,
    ) -> None:
        self.url = base_url(url)
        self.session = session
        self.new_link = new_link
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.link: Link | None = None
        self.world_size: int | None = None
        """1 trainer + the server's workers, once connected."""

    def call(self, request: ControlRequest) -> Response:
        url = self.url + request.path
        try:
            if request.method == "GET":
                response = self.session.get(url, headers=self.headers, timeout=self.timeout)
            else:
                response = self.session.post(
                    url, json=request.body, headers=self.headers, timeout=self.timeout
                )
        except OSError as e:  # urllib's URLError and socket timeouts are OSErrors
            raise WeightSyncError(f"{url} did not answer: {e}") from e
        check_response(url, response)
        return response

    def connect(self) -> None:
        workers = int(self.call(world_size_request()).json()["world_size"])
        world_size = 1 + workers
        link = self.new_link()
        request = init_request(link.master_address, link.master_port, world_size)
        # the server's init call returns only once the trainer has joined, and vice versa
        init = _in_background(self.call, request)
        try:
            link.open(world_size)
            init.result()
        except BaseException:
            link.close()
            if init.done() and init.exception() is not None:
                raise init.exception() from None  # the server's reason beats a rendezvous timeout
            raise
        self.link, self.world_size = link, world_size

    def push(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        update = update_request(state)  # a bad state fails here, before the server is paused
        if self.link is None:
            self.connect()
        assert self.link is not None
        self.call(pause_request())
        self.call(start_request())
        # the workers receive inside the update call: it must run during the broadcast
        received = _in_background(self.call, update)
        self.link.send(state.items())
        received.result()
        self.call(finish_request(version))
        self.call(resume_request())

    def close(self) -> None:
        link, self.link, self.world_size = self.link, None, None
        if link is None:
            return
        try:
            self.call(shutdown_request())
        finally:
            link.close()


class VLLMWeightSync:
    """Pushes full state dicts to one or more vLLM servers (NCCL data plane, HTTP control).

    Untested on a GPU (see the module docstring). Nothing is contacted until the first
    ``push``, which sets up one NCCL group per server. ``session`` (the HTTP client) and
    ``new_link`` (the NCCL end) may be replaced before then, as the tests do."""

    def __init__(
        self, urls: list[str], api_key: str = "", device: str = "cuda", timeout: float = 600.0
    ):
        if isinstance(urls, str) or not urls:
            raise ValueError(f"VLLMWeightSync needs a list of server URLs, got {urls!r}")
        self.urls = [base_url(u) for u in urls]
        self.api_key = api_key
        self.device = device
        self.timeout = timeout
        self.version: int | None = None
        """The last version every server acknowledged, or None before the first push."""
        self.session: Session = UrllibSession()
        self.new_link: Callable[[], Link] = lambda: NcclLink(self.device)
        self._servers: list[ServerSync] | None = None

    def push(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Send every tensor of `state` (names as the HF model's state_dict) to every server;
        returns once the servers use them. `version` is recorded (here and as each server's
        weight version; vLLM's OpenAI completions carry no version, so the caller tracks
        versions client-side)."""
        if self._servers is None:
            self._servers = [
                ServerSync(
                    url, self.session, self.new_link, api_key=self.api_key, timeout=self.timeout
                )
                for url in self.urls
            ]
        for server in self._servers:  # one at a time: each broadcast has the GPU's links alone
            server.push(state, version)
        self.version = version

    def close(self) -> None:
        """Release every server's weight-transfer engine and the trainer's communicators.
        Every server is tried; the first error is raised after."""
        servers, self._servers = self._servers or [], None
        errors: list[BaseException] = []
        for server in servers:
            try:
                server.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


def make_vllm_sync(urls: Sequence[str] | str, api_key: str = "") -> VLLMWeightSync:
    """The factory to choose this sync by name: a ``VLLMWeightSync`` on ``device="cuda"``.
    ``urls`` may also be one comma-separated string, as a command-line flag gives it."""
    if isinstance(urls, str):
        urls = [u for u in urls.split(",") if u.strip()]
    return VLLMWeightSync(list(urls), api_key=api_key)
