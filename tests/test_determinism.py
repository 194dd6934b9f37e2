"""Training on CPU is deterministic for a fixed seed and thread count (``make_accelerator``
turns on torch's deterministic algorithms there)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ahamoment.distributed import make_accelerator
from ahamoment.logprobs import completion_logprobs


@pytest.fixture
def two_threads_and_restore():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _grads_of_repeated_backward(repeats: int = 3) -> float:
    """Largest difference between the gradients of identical backward passes: 16 prompts x 8
    completions of 20-60 tokens, one group per micro-batch, as `aha zero` trains."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    rng = random.Random(0)
    shared = [[rng.randrange(3, 256) for _ in range(40)] for _ in range(16)]
    prompts = [p for p in shared for _ in range(8)]
    comps = [[rng.randrange(3, 256) for _ in range(rng.randint(20, 60))] for _ in prompts]

    def grads():
        model.zero_grad()
        for c in range(0, len(prompts), 8):
            logp, mask, _ = completion_logprobs(model, prompts[c : c + 8], comps[c : c + 8])
            (logp * mask).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    first = grads()
    return max(
        max((a - b).abs().max().item() for a, b in zip(first, grads())) for _ in range(repeats)
    )


def test_repeated_backward_passes_are_bit_identical_on_cpu(two_threads_and_restore):
    torch.use_deterministic_algorithms(False)
    make_accelerator("cpu", bf16=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory  # see deterministic_cpu
    assert _grads_of_repeated_backward() == 0.0
