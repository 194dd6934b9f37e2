"""Generation engines behind one interface (see ``base``): "torch" (ours, default, with the
fused decoding step of ``compiled``), "torch-eager" (ours, plain torch ops), "hf"
(transformers ``generate``, the reference), "vllm" (GPU, optional extra), "openai" (any
OpenAI-compatible endpoint) and "server" (rollout servers apart from the trainer, weights pushed
to them: ``server_engine``). Budget forcing (s1) lives in ``budget``, torch engine only."""

from ahamoment.rollout.base import (
    ENGINES,
    Completion,
    Engine,
    Request,
    SamplingParams,
    TokenEvent,
    make_engine,
)
from ahamoment.rollout.budget import ThinkingBudget
from ahamoment.rollout.hf_engine import HFEngine
from ahamoment.rollout.openai_engine import OpenAIEngine, TextRequest
from ahamoment.rollout.sampler import FusedTorchEngine, TorchEngine, sample, sample_stream
from ahamoment.rollout.server_engine import ServerEngine
from ahamoment.rollout.vllm_engine import VLLMEngine, vllm_sampling_kwargs

__all__ = [
    "ENGINES",
    "Completion",
    "FusedTorchEngine",
    "Engine",
    "HFEngine",
    "OpenAIEngine",
    "Request",
    "SamplingParams",
    "ServerEngine",
    "TextRequest",
    "ThinkingBudget",
    "TokenEvent",
    "TorchEngine",
    "VLLMEngine",
    "make_engine",
    "sample",
    "sample_stream",
    "vllm_sampling_kwargs",
]
