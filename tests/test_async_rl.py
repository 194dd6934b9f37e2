"""Rollout servers apart from the trainer: token ids and weight versions from `aha serve`, the
authenticated weight push, the server engine's fault handling, the rollout pipeline's
staleness bound, and K = 0 training equal to the colocated engine's."""

from __future__ import annotations

import copy
import json
import random
import time

import pytest
import torch
from accelerate import Accelerator
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from safetensors.torch import save as save_safetensors

from ahamoment.prompts import encode_prompts, stop_ids
from ahamoment.rl.pipeline import RolloutPipeline, StepSample, drop_stale
from ahamoment.rl.rollouts import Rollout
from ahamoment.rl.tis import IMPORTANCE
from ahamoment.rl.update import TrainBatch, policy_update
from ahamoment.rollout import Completion, Request, SamplingParams, TorchEngine
from ahamoment.rollout.server_engine import ServerEngine, http
from ahamoment.server import Service, make_app
from ahamoment.stages.zero import ZeroConfig
from ahamoment.tasks import get_task
from tests_support import serve_on_loopback

torch.set_num_threads(1)
WKEY = "push-secret"


def make_service(model, tokenizer, **kw) -> Service:
    opts = dict(name="tiny", max_tokens=48, max_n=8, batch_wait_ms=5.0, compile=False) | kw
    return Service(copy.deepcopy(model), tokenizer, weights_key=WKEY, **opts)


def _prompts(tokenizer, n: int, seed: int = 0) -> tuple[list, list[list[int]]]:
    task, rng = get_task("countdown"), random.Random(seed)
    problems = [task.sample(rng) for _ in range(n)]
    return problems, encode_prompts(tokenizer, problems)


def _post(url: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    status, raw = http("POST", url + path, body, headers, 30)
    return status, json.loads(raw)


def test_completions_carry_token_ids_logprobs_and_the_weight_version(tiny_model, tiny_tokenizer):
    service = make_service(tiny_model, tiny_tokenizer)
    _, [prompt] = _prompts(tiny_tokenizer, 1)
    body = {"model": "tiny", "prompt": prompt, "n": 3, "max_tokens": 24, "logprobs": 0}
    body |= {"return_token_ids": True, "stop_token_ids": list(stop_ids(tiny_tokenizer))}
    with serve_on_loopback(make_app(service)) as url:
        status, resp = _post(url, "/v1/completions", json.dumps(body).encode(), {})
    assert status == 200 and resp["weight_version"] == 0 and len(resp["choices"]) == 3
    for c in resp["choices"]:
        ids, lps = c["token_ids"], c["logprobs"]["token_logprobs"]
        assert 1 <= len(ids) <= 24 and len(lps) == len(ids) and all(x <= 0 for x in lps)
        if c["finish_reason"] == "stop":  # the stop id is kept, as every engine keeps it
            assert ids[-1] in stop_ids(tiny_tokenizer)
        else:
            assert len(ids) == 24


def _group_requests(tokenizer, n_groups: int, G: int) -> tuple[list, list[Request]]:
    problems, prompts = _prompts(tokenizer, n_groups, seed=3)
    params = SamplingParams(1.0, 1.0, 0, 40, stop_ids(tokenizer))
    return problems, [Request(p, params, G) for p in prompts]


def _train(model0, batch: Rollout, G: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Stats and weights after one `policy_update` (SGD, TIS on) from a copy of model0."""
    model = copy.deepcopy(model0).train()
    cfg = ZeroConfig(prompts_per_step=len(batch) // G, group_size=G, kl_coef=0.0, tis_cap=2.0)
    cfg.max_grad_norm = 1e9
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    adv = torch.linspace(-1, 1, len(batch))  # (B,) any fixed advantages
    tb = TrainBatch(batch, adv, torch.ones(len(batch), dtype=torch.bool), None, None)
    pad = 0
    stats = policy_update(model, opt, acc, tb, cfg.update_settings(pad), torch.Generator())
    return stats, {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}


def test_k0_server_samples_equal_the_colocated_engine_and_train_alike(tiny_model, tiny_tokenizer):
    # A seeded group is decoded alone on the server under a generator seeded by it, so the
    # colocated torch engine given the same seed samples the very same tokens; the trainer then
    # sees identical ids and sampler log-probs, and takes the same step (TIS on, so the
    # sampler's log-probs enter the gradient).
    G, n_groups = 4, 3
    problems, requests = _group_requests(tiny_tokenizer, n_groups, G)
    service = make_service(tiny_model, tiny_tokenizer)
    with serve_on_loopback(make_app(service)) as url:
        remote = ServerEngine(None, tiny_tokenizer, urls=[url], weights_key=WKEY, seeded=True)
        served = remote.generate(requests, torch.Generator().manual_seed(7))
    seeds = torch.Generator().manual_seed(7)
    local = TorchEngine(copy.deepcopy(tiny_model), tiny_tokenizer)
    colocated = []
    for r in requests:  # the server engine draws one seed per group, in order
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=seeds))
        colocated += local.generate([r], torch.Generator().manual_seed(seed))
    n_tokens = 0
    for a, b in zip(served, colocated):
        assert [c.ids for c in a] == [c.ids for c in b]
        assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
        for ca, cb in zip(a, b):
            torch.testing.assert_close(ca.logprobs, cb.logprobs, rtol=0, atol=1e-6)
            assert ca.version == 0 and cb.version is None
            n_tokens += len(ca.ids)
    assert n_tokens > n_groups * G  # not all empty

    def rollout(groups):
        comps = [c for g in groups for c in g]
        rows = [i for i in range(n_groups) for _ in range(G)]
        return Rollout([problems[i] for i in rows], [list(requests[i].prompt) for i in rows], comps)

    stats_a, after_a = _train(tiny_model, rollout(served), G)
    stats_b, after_b = _train(tiny_model, rollout(colocated), G)
    assert abs(stats_a["loss"] - stats_b["loss"]) < 1e-6
    moved = max((after_a[k] - tiny_model.state_dict()[k]).abs().max() for k in after_a)
    assert moved > 1e-4  # the step is not vacuous
    for k in after_a:
        torch.testing.assert_close(after_a[k], after_b[k], rtol=0, atol=1e-6)
    # the server sampled with the trainer's own weights: its log-probs are the trainer's
    assert stats_a["sampler_mismatch"] < 1e-4


def _state_blob(model) -> bytes:
    return save_safetensors(
        {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    )


def test_weight_push_needs_the_key_and_a_matching_state_dict(tiny_model, tiny_tokenizer):
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    blob = _state_blob(trained)
    good = {"Authorization": f"Bearer {WKEY}", "X-Weight-Version": "5"}
    no_key = make_service(tiny_model, tiny_tokenizer)
    no_key.weights_key = b""
    service = make_service(tiny_model, tiny_tokenizer)
    with serve_on_loopback(make_app(no_key)) as url:
        status, resp = _post(url, "/v1/weights", blob, good)
        assert status == 403 and resp["error"]["code"] == "weight_updates_off"
    with serve_on_loopback(make_app(service)) as url:
        wrong = good | {"Authorization": "Bearer nope"}
        assert _post(url, "/v1/weights", blob, wrong)[0] == 401
        assert _post(url, "/v1/weights", b"not safetensors", good)[0] == 400
        half = {k: v.clone() for k, v in list(trained.state_dict().items())[:3]}
        status, resp = _post(url, "/v1/weights", save_safetensors(half), good)
        assert status == 400 and "missing" in resp["error"]["message"]
        no_version = {"Authorization": f"Bearer {WKEY}"}
        assert _post(url, "/v1/weights", blob, no_version)[0] == 400
        assert service.weight_version == 0  # nothing changed so far
        status, resp = _post(url, "/v1/weights", blob, good)
        assert status == 200 and resp["weight_version"] == 5 and resp["applied"]  # idle server
        _, raw = http("GET", url + "/v1/weights", None, {}, 10)
        now = json.loads(raw)
        assert now["weight_version"] == 5 and now["pending_version"] is None
        assert now["instance"] == service.instance == resp["instance"]
        # it now samples from the pushed weights: greedy equals the trained model's own
        _, [prompt] = _prompts(tiny_tokenizer, 1)
        params = SamplingParams(0.0, 1.0, 0, 16, stop_ids(tiny_tokenizer))
        engine = ServerEngine(None, tiny_tokenizer, urls=[url], weights_key=WKEY)
        [[served]] = engine.generate([Request(prompt, params)])
    [[own]] = TorchEngine(trained, tiny_tokenizer).generate([Request(prompt, params)])
    assert served.ids == own.ids and served.version == 5
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(service.model.state_dict()[k], v, rtol=0, atol=0)


def _failing_app() -> FastAPI:
    """A server that lists a model and fails every completion with a 500."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "tiny"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def fail():
        return JSONResponse({"error": {"message": "boom"}}, status_code=500)

    return app


def test_groups_on_a_failing_server_are_sent_again_whole(tiny_model, tiny_tokenizer):
    G = 4
    _, requests = _group_requests(tiny_tokenizer, 6, G)
    service = make_service(tiny_model, tiny_tokenizer)
    with serve_on_loopback(make_app(service)) as good, serve_on_loopback(_failing_app()) as bad:
        engine = ServerEngine(None, tiny_tokenizer, urls=[bad, good], concurrency=1)
        out = engine.generate(requests)
        stats = engine.take_stats()
    assert [len(g) for g in out] == [G] * 6  # every group, whole
    assert all(c.version == 0 and c.ids for g in out for c in g)
    # the first group went to the failing server (round-robin), was sent again, and the
    # server stayed down for the rest (it is probed again only after a second)
    assert stats["groups_resent"] == 1 and stats["servers_lost"] == 1
    assert stats["servers_up"] == 1


def test_a_restarted_server_gets_the_weights_before_it_serves(tiny_model, tiny_tokenizer):
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.1)
    service = make_service(tiny_model, tiny_tokenizer)
    _, requests = _group_requests(tiny_tokenizer, 2, 2)
    with serve_on_loopback(make_app(service)) as url:
        engine = ServerEngine(None, tiny_tokenizer, urls=[url], weights_key=WKEY)
        engine.sync_weights(trained, version=3)
        assert service.weight_version == 3
        # a restart: a new process (instance) with the weights it was started with
        service.load_weights(_state_blob(tiny_model), 0)
        service.instance = "restarted"
        out = engine.generate(requests)
        stats = engine.take_stats()
    # the answer from the new instance was refused, the server re-pushed, then it served
    assert all(c.version == 3 for g in out for c in g)
    assert stats["servers_lost"] == 1 and stats["servers_revived"] == 1
    assert stats["groups_resent"] >= 1 and service.weight_version == 3
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(service.model.state_dict()[k], v, rtol=0, atol=0)


# --- the pipeline ------------------------------------------------------------------------------
def _fake_batch(versions: list[int | None], G: int = 2) -> Rollout:
    comps = [Completion([1], [0.0], "stop", "x", version=v) for v in versions for _ in range(G)]
    n = len(comps)
    return Rollout(list(range(n)), [[1]] * n, comps)


def test_drop_stale_keeps_fresh_and_unstamped_groups():
    batch = _fake_batch([5, 3, None, 4])
    kept, dropped = drop_stale(batch, oldest=4, group_size=2)
    assert dropped == 1 and [c.version for c in kept.completions] == [5, 5, None, None, 4, 4]


class _Recorder:
    """A fake `sample(step)`: records which weight version was published when each step was
    sampled, and stamps its completions with it."""

    def __init__(self) -> None:
        self.pipeline: RolloutPipeline | None = None
        self.seen: dict[int, int] = {}

    def __call__(self, step: int) -> StepSample:
        v = self.pipeline.version if self.pipeline else 0
        self.seen[step] = v
        time.sleep(0.01)
        return StepSample(step, _fake_batch([v, v]), _fake_batch([v, v]), {}, torch.Generator())


@pytest.mark.parametrize("K", [0, 1, 2])
def test_pipeline_never_samples_more_than_k_versions_behind(K):
    rec = _Recorder()
    pipe = RolloutPipeline(rec, start=0, end=8, max_staleness=K, group_size=2)
    rec.pipeline = pipe
    for step in range(8):
        got = pipe.get(step)
        assert got.step == step and got.info["groups_stale"] == 0
        assert step - K <= rec.seen[step] <= step
        time.sleep(0.03)  # "training": the sampler may run ahead meanwhile
        pipe.published(step + 1)
    pipe.close()
    if K:  # it did run ahead: some step was sampled before the weights it trains
        assert any(rec.seen[s] < s for s in range(1, 8))
    else:
        assert all(rec.seen[s] == s for s in range(8))


def test_pipeline_resamples_a_step_with_only_stale_groups_and_raises_sampler_errors():
    calls = []

    def sample(step):
        calls.append(step)
        v = 0 if len(calls) == 1 else step  # the first answer comes from old weights
        return StepSample(step, _fake_batch([v]), _fake_batch([v]), {}, torch.Generator())

    pipe = RolloutPipeline(sample, start=5, end=6, max_staleness=0, group_size=2)
    got = pipe.get(5)
    assert calls == [5, 5] and got.info["groups_stale"] == 1 and len(got.batch) == 2

    def broken(step):
        raise ValueError("no server")

    pipe = RolloutPipeline(broken, start=0, end=3, max_staleness=1, group_size=2)
    with pytest.raises(ValueError, match="no server"):
        pipe.get(0)
    pipe.close()


def test_mask_importance_drops_tokens_over_the_cap():
    old = torch.tensor([[0.0, -1.0, -2.0]])
    samp = torch.tensor([[0.0, -2.0, -1.0]])  # w = 1, e, 1/e
    mask = torch.tensor([[1, 1, 1]])
    w_mask = IMPORTANCE.get("mask")(old, samp, mask, 2.0)
    w_trunc = IMPORTANCE.get("truncate")(old, samp, mask, 2.0)
    torch.testing.assert_close(w_mask, torch.tensor([[1.0, 0.0, torch.e**-1]]))
    torch.testing.assert_close(w_trunc, torch.tensor([[1.0, 2.0, torch.e**-1]]))


def test_async_settings_are_checked():
    with pytest.raises(ValueError, match="--rollout-server"):
        ZeroConfig(max_staleness=1, tis_cap=2.0)
    with pytest.raises(ValueError, match="--tis-cap"):
        ZeroConfig(max_staleness=1, rollout_server="http://x")
    with pytest.raises(ValueError, match="importance"):
        ZeroConfig(importance="clip")
    name, options = ZeroConfig(
        rollout_server="http://a:1, http://b:2", group_size=4
    ).rollout_engine()
    assert name == "server" and options["urls"] == ["http://a:1", "http://b:2"]
    assert options["max_n"] == 4


def test_a_push_during_a_batch_is_taken_before_the_next_one(tiny_model, tiny_tokenizer):
    # The push answers at once while a batch decodes; that batch keeps the old weights (its
    # completions say version 0), the next batch starts on the new ones (version 1).
    service = make_service(tiny_model, tiny_tokenizer)
    trained = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(0.9)
    service.weights_lock.acquire()  # a batch is decoding
    assert service.load_weights(_state_blob(trained), 1) is False
    assert service.weight_version == 0 and service.pending[1] == 1
    service.weights_lock.release()
    _, requests = _group_requests(tiny_tokenizer, 1, 2)
    with serve_on_loopback(make_app(service)) as url:
        [group] = ServerEngine(None, tiny_tokenizer, urls=[url]).generate(requests)
    assert [c.version for c in group] == [1, 1] and service.pending is None
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(service.model.state_dict()[k], v, rtol=0, atol=0)


def test_detokenize_false_returns_the_same_ids_without_text(tiny_model, tiny_tokenizer):
    service = make_service(tiny_model, tiny_tokenizer)
    _, [prompt] = _prompts(tiny_tokenizer, 1)
    body = {"model": "tiny", "prompt": prompt, "n": 2, "max_tokens": 16, "logprobs": 0}
    body |= {"return_token_ids": True, "seed": 5}
    with serve_on_loopback(make_app(service)) as url:
        _, full = _post(url, "/v1/completions", json.dumps(body).encode(), {})
        raw = json.dumps(body | {"detokenize": False}).encode()
        _, bare = _post(url, "/v1/completions", raw, {})
    for a, b in zip(full["choices"], bare["choices"]):
        assert a["token_ids"] == b["token_ids"] and a["text"] and b["text"] == ""
        assert a["logprobs"]["token_logprobs"] == b["logprobs"]["token_logprobs"]


def test_a_server_reference_gives_the_trainers_kl_anchor(tiny_model, tiny_tokenizer):
    # The server keeps its starting weights as the reference; after a push it samples from
    # the new weights, yet its ref_logprobs are still the reference's, equal to what the
    # trainer's own reference forward gives (anchor), to float rounding.
    from ahamoment.rl.update import anchor
    from ahamoment.server_protocol import state_sha

    G = 4
    problems, requests = _group_requests(tiny_tokenizer, 2, G)
    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    service = make_service(tiny_model, tiny_tokenizer, reference=True)
    assert service.reference_sha == state_sha(tiny_model)
    with serve_on_loopback(make_app(service)) as url:
        engine = ServerEngine(
            None, tiny_tokenizer, urls=[url], weights_key=WKEY,
            reference_sha=state_sha(tiny_model),
        )  # fmt: skip
        engine.sync_weights(moved, version=1)
        served = [c for g in engine.generate(requests) for c in g]
        other = ServerEngine(None, tiny_tokenizer, urls=[url], reference_sha="another model")
        [[unasked, *_], *_] = other.generate(requests)
    assert unasked.ref_logprobs is None  # a reference that is not the trainer's is not used
    assert all(c.version == 1 and len(c.ref_logprobs) == len(c.ids) for c in served)
    rows = [i for i in range(2) for _ in range(G)]
    batch = Rollout([problems[i] for i in rows], [list(requests[i].prompt) for i in rows], served)
    cfg = ZeroConfig(prompts_per_step=2, group_size=G, kl_coef=0.05)
    rewards = torch.zeros(len(batch))
    settings = cfg.update_settings(0)
    from_servers = anchor(moved, tiny_model, batch, rewards, settings, "loss").ref_logp
    for c in batch.completions:
        c.ref_logprobs = None
    own = anchor(moved, tiny_model, batch, rewards, settings, "loss").ref_logp
    assert own.shape == from_servers.shape and own.abs().sum() > 1
    torch.testing.assert_close(from_servers, own, rtol=0, atol=1e-5)
    # and they are the reference's, not the pushed policy's
    policy = anchor(tiny_model, moved, batch, rewards, settings, "loss").ref_logp
    assert (policy - own).abs().max() > 1e-3


def test_no_server_at_all_is_one_clear_error_at_once(tiny_tokenizer):
    from tests_support import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.monotonic()
    with pytest.raises(ConnectionError, match="no rollout server answers at .*aha serve"):
        ServerEngine(None, tiny_tokenizer, urls=[url])
    assert time.monotonic() - t < 10  # not the 120 s a server lost mid-run is waited for
