"""Generation engines behind one interface (see ``base``): "torch" (ours, default), "hf"
(transformers ``generate``, the reference) and "vllm" (GPU, optional extra)."""

from ahamoment.rollout.base import (
    ENGINES,
    Completion,
    Engine,
    Request,
    SamplingParams,
    TokenEvent,
    make_engine,
)
from ahamoment.rollout.hf_engine import HFEngine
from ahamoment.rollout.sampler import TorchEngine, sample, sample_stream
from ahamoment.rollout.vllm_engine import VLLMEngine, vllm_sampling_kwargs

__all__ = [
    "ENGINES",
    "Completion",
    "Engine",
    "HFEngine",
    "Request",
    "SamplingParams",
    "TokenEvent",
    "TorchEngine",
    "VLLMEngine",
    "make_engine",
    "sample",
    "sample_stream",
    "vllm_sampling_kwargs",
]
