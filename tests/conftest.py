"""Shared fixtures: a tiny model and tokenizer built from a config, no network, one thread."""

from __future__ import annotations

import random

import pytest
import torch

from ahamoment.models import build_tokenizer, new_model, tiny_llama_config
from ahamoment.prompts import r1_zero_prompt
from ahamoment.tasks import get_task
from ahamoment.tasks.base import TraceNoise

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AHAMOMENT_CACHE", str(tmp_path / "cache"))


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    task = get_task("countdown")
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        p = task.sample(rng)
        docs.append(r1_zero_prompt(p.question) + task.trace(p, rng, TraceNoise()))
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer(corpus(), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    cfg = tiny_llama_config(
        tiny_tokenizer, hidden=32, layers=2, heads=2, intermediate=64, max_positions=512
    )
    return new_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def gqa_model(tiny_tokenizer):
    """head_dim 32 (an unrolled kernel path of the fused step), 2 query heads per kv head."""
    cfg = tiny_llama_config(
        tiny_tokenizer, hidden=128, layers=2, heads=4, intermediate=96, max_positions=512
    )
    cfg.num_key_value_heads = 2
    return new_model(cfg, seed=1).eval()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny base model built once by the real `aha pretrain` (recipes/pretrain-tiny.yaml);
    tests read it, never write it."""
    from test_zero_e2e import TINY, aha

    out = tmp_path_factory.mktemp("base") / "model"
    aha("pretrain", "--recipe", TINY, "--out", str(out), "--threads", "1")
    return out
