"""vLLM engine for GPUs: ``pip install 'ahamoment[vllm]'`` (CUDA only; see pyproject for pins).

vLLM is imported inside ``VLLMEngine`` only, so ``import ahamoment`` never needs it. The code
follows the vLLM 0.31 API as TRL 1.16 drives it in colocate mode
(``trl/generation/vllm_generation.py``: ``LLM(..., distributed_executor_backend=
"external_launcher", logprobs_mode="processed_logprobs")``, weights pushed through
``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`` and then
``llm.reset_prefix_cache()``), and ``vllm.SamplingParams`` / ``LLMEngine.add_request`` /
``LLMEngine.step`` as documented for vLLM 0.2x-0.3x. It has not been run here (no GPU).

Log-probs. ``SamplingParams(logprobs=0)`` returns, per generated token, a dict holding only
the sampled token's ``Logprob``. Its meaning is set per engine by ``logprobs_mode``: vLLM's
default, ``"raw_logprobs"``, is ``log_softmax`` of the raw logits, *before* temperature,
penalties and top-k/top-p. We start vLLM with ``"processed_logprobs"``: after temperature and
after top-k/top-p truncation, renormalised over the kept tokens. This equals our definition,
``log_softmax(logits / T)`` before truncation, whenever ``top_p == 1`` and ``top_k == 0``, and
for greedy rows (vLLM applies no temperature to them); under truncation vLLM's value is larger
by ``-log(kept mass)``. No vLLM mode gives our exact quantity under truncation.

Other differences from the torch engine:

- vLLM rejects ``n > 1`` for greedy requests; greedy is deterministic, so one completion is
  generated and copied ``n`` times;
- vLLM clamps temperatures in (0, 0.01) up to 0.01, and recent versions reject T > 2;
- ``ignore_eos=True`` so that, as in our engines, only ``stop_ids`` stop a row;
- stop strings are matched by vLLM's detokenizer, which loads the tokenizer from the model
  directory with ``AutoTokenizer`` (mind the Qwen2 tokenizer swap in FINDINGS.md); the stop
  string is kept (``include_stop_str_in_output=True``), as in ours;
- ``stream`` drives ``llm.llm_engine`` step by step, so it assumes no other request is in
  flight on the same ``LLM``;
- with a ``generator``, each request gets a seed drawn from it (vLLM's per-request seed), so
  runs are reproducible, but draws differ from the torch engine's;
- LoRA (``lora.py``): ``sync_weights`` pushes the base weights with the adapters merged in
  (``sync_payload``), so vLLM runs a plain model and needs no ``enable_lora``; this costs one
  full-weight transfer per step, as for full fine-tuning.
- sampler/trainer log-prob mismatch: `aha zero` logs it (``sampler_mismatch``) and can correct
  for it with truncated importance sampling (``--tis-cap``, ``rl/tis.py``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ahamoment.lora import merged_state_dict
from ahamoment.rollout.base import ENGINES, Completion, Request, SamplingParams, TokenEvent
from ahamoment.rollout.budget import reject_budget

INSTALL_HINT = "pip install 'ahamoment[vllm]'"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"the 'vllm' rollout engine needs vLLM, which is not installed: {INSTALL_HINT} "
            "(CUDA GPUs only; the extra pins vLLM, torch and transformers together, see "
            "pyproject.toml). Use the 'torch' engine on CPU."
        ) from e
    return vllm


def vllm_sampling_kwargs(
    params: SamplingParams, n: int = 1, seed: int | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` equivalent to ``params`` with ``n`` samples."""
    reject_budget(params, "vllm")
    if params.max_new_tokens < 1:
        raise ValueError("vLLM needs max_new_tokens >= 1")
    greedy = params.greedy
    return {
        "n": 1 if greedy else n,  # vLLM rejects n > 1 for greedy: the engine copies it
        "temperature": 0.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": 0 if greedy else params.top_k,  # vLLM: 0 (or -1) disables top-k
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop) or None,
        "stop_token_ids": list(params.stop_ids) or None,
        "include_stop_str_in_output": True,
        "ignore_eos": True,
        "logprobs": 0,  # only the sampled token's log-prob
        "skip_special_tokens": False,
        "seed": seed,
    }


def completion_from_vllm(output: Any) -> Completion:
    """Our ``Completion`` from a vLLM ``CompletionOutput`` (``token_ids``, ``logprobs``,
    ``finish_reason``); ``logprobs[i]`` maps token id -> ``Logprob`` with a ``.logprob``."""
    ids = [int(t) for t in output.token_ids]
    if output.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs: the request needs logprobs=0")
    lps = [float(pos[t].logprob) for t, pos in zip(ids, output.logprobs)]
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={output.finish_reason!r}")
    return Completion(ids, lps, output.finish_reason)


def sync_payload(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(HF name, tensor)`` pairs for vLLM's ``load_weights``: the model's parameters and
    buffers under plain HF names, LoRA adapters merged (``lora.merged_state_dict``)."""
    return [(name, t.detach()) for name, t in merged_state_dict(model).items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """The rendezvous variables vLLM's external_launcher executor reads, for one process."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "localhost")
    if os.environ.get("MASTER_PORT", "").strip().lower() in ("", "0", "auto"):
        os.environ["MASTER_PORT"] = str(_free_port())


def _seed(generator: torch.Generator | None) -> int | None:
    if generator is None:
        return None
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@ENGINES.register("vllm")
class VLLMEngine:
    """vLLM's ``LLM`` in this process, colocated with the trainer on one GPU.

    ``model``: a model directory, or a model whose ``name_or_path`` is one (vLLM loads the
    architecture and first weights from disk; later weights come from ``sync_weights``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.5,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        vllm = _import_vllm()
        path = model if isinstance(model, str | os.PathLike) else getattr(model, "name_or_path", "")
        if not path or not Path(path, "config.json").exists():
            raise ValueError(
                f"vLLM loads the model from a directory, got {path!r}: save it first "
                "(ahamoment.models.save_model) and pass that directory"
            )
        if dtype is None:  # the trainer's dtype; vLLM's "auto" turns float32 into float16
            param = next(model.parameters(), None) if hasattr(model, "parameters") else None
            dtype = str(param.dtype).removeprefix("torch.") if param is not None else "auto"
        _single_process_env()
        self.llm = vllm.LLM(
            model=str(path),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            logprobs_mode="processed_logprobs",
            distributed_executor_backend="external_launcher",
            generation_config="vllm",  # ignore the checkpoint's sampling defaults
            **llm_kwargs,
        )
        self.tokenizer = tokenizer
        self._vllm = vllm
        self._next_id = 0

    def _params(self, request: Request, generator: torch.Generator | None) -> Any:
        kwargs = vllm_sampling_kwargs(request.params, request.n, _seed(generator))
        return self._vllm.SamplingParams(**kwargs)

    def generate(
        self, requests: Sequence[Request], generator: torch.Generator | None = None
    ) -> list[list[Completion]]:
        prompts = [{"prompt_token_ids": list(r.prompt)} for r in requests]
        params = [self._params(r, generator) for r in requests]
        outs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        result = []
        for r, out in zip(requests, outs):
            comps = [completion_from_vllm(o) for o in sorted(out.outputs, key=lambda o: o.index)]
            if len(comps) < r.n:  # greedy: one completion, copied
                comps = [
                    Completion(list(c.ids), list(c.logprobs), c.finish_reason) for c in comps * r.n
                ]
            result.append(comps)
        return result

    def stream(
        self, request: Request, generator: torch.Generator | None = None
    ) -> Iterator[TokenEvent]:
        params = self._params(request, generator)
        params.output_kind = self._vllm.sampling_params.RequestOutputKind.DELTA
        copies = request.n if request.params.greedy else 1
        engine = self.llm.llm_engine
        request_id = f"ahamoment-stream-{self._next_id}"
        self._next_id += 1
        engine.add_request(request_id, {"prompt_token_ids": list(request.prompt)}, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                for o in out.outputs:  # DELTA: only the tokens new since the last step
                    lps = o.logprobs or []
                    for j, t in enumerate(o.token_ids):
                        last = o.finish_reason is not None and j == len(o.token_ids) - 1
                        for c in range(copies):
                            yield TokenEvent(
                                o.index + c,
                                int(t),
                                float(lps[j][t].logprob),
                                o.finish_reason if last else None,
                            )

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """Push the trainer's weights into vLLM's copy (after every optimizer step).

        vLLM 0.31 / TRL 1.16 colocate path: the external_launcher executor runs the worker in
        this process, so its model is reachable and ``load_weights`` maps HF parameter names
        (``model.layers.0.self_attn.q_proj.weight`` ...) onto vLLM's fused layout itself. A
        LoRA model's adapters are merged into those weights first (``sync_payload``).
        """
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        target.load_weights(sync_payload(model))
        self.llm.reset_prefix_cache()  # cached prefix KV was computed with the old weights
