"""What a trainer and an `aha serve` process agree on, importable without FastAPI: the
environment variables that carry the bearer keys, and the fingerprint that names a model's
weights (a trainer's KL reference, held by rollout servers, is matched by it)."""

from __future__ import annotations

import hashlib

import torch

API_KEY_ENV = "AHA_API_KEY"
"""Environment variable of the bearer key clients send (`aha serve`, and a trainer's requests)."""
WEIGHTS_KEY_ENV = "AHA_WEIGHTS_KEY"
"""Environment variable of the bearer key a trainer sends to push weights."""


def state_sha(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict as safetensors bytes (names, dtypes, shapes, values):
    equal on two machines exactly when the weights are."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return hashlib.sha256(save(state)).hexdigest()
