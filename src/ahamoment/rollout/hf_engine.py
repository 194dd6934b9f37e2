"""The reference engine: transformers' own ``generate``.

Slow, but independent of our sampler: the tests compare the two. Each request is one
``generate`` call over its ``n`` copies (one prompt, so no padding). Log-probs use
``output_logits`` (the raw logits, before any logits processor) so that they follow the
shared definition, ``log_softmax(logits / temperature)`` before top-p/top-k; ``output_scores``
would give the processed, truncated scores instead.

Differences from our sampler that a reader should know:

- sampling draws from the global torch RNG; a ``generator`` seeds it inside ``fork_rng``, so
  runs are reproducible but draws differ from our sampler's for the same seed;
- a fresh ``GenerationConfig`` is passed, so the model's own generation defaults (top-k 50, its
  EOS) do not apply; ``eos_token_id`` is exactly ``stop_ids`` (``[]`` ignores EOS);
- stop strings use a stopping criterion with the same decode-and-check rule as ours;
- ``stream`` runs the whole request, then replays its tokens: it is not incremental.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from ahamoment import lora
from ahamoment.rollout.base import (
    ENGINES,
    Completion,
    Request,
    StopStrings,
    TokenEvent,
    resolve_pad_id,
    truncate,
)
from ahamoment.rollout.budget import reject_budget


class _StopStringCriteria(StoppingCriteria):
    """Per-row stop-string check on the generated part of ``input_ids``."""

    def __init__(self, stops: StopStrings, prompt_len: int) -> None:
        self.stops = stops
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len :].tolist()
        return torch.tensor([self.stops.hit(row) for row in gen], device=input_ids.device)


@ENGINES.register("hf")
class HFEngine:
    decodes_module = True
    """Decodes the module it was given in this process (``sync_weights`` copies weights in)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any = None, *, pad_id: int | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = resolve_pad_id(tokenizer, pad_id)

    @torch.no_grad()
    def _one(self, request: Request, generator: torch.Generator | None) -> list[Completion]:
        p = request.params
        reject_budget(p, "hf")
        if p.max_new_tokens == 0:
            return [Completion([], [], "length") for _ in range(request.n)]
        stops = StopStrings(self.tokenizer, p.stop)
        device = next(self.model.parameters()).device
        prompt = torch.tensor([request.prompt] * request.n, dtype=torch.long, device=device)
        # the RNG state a seeded call changes, restored afterwards
        rng_devices = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []
        # Every unset (None) field is filled from the model's generation_config, so each
        # processor a checkpoint may switch on is set to its neutral value here.
        # top_k=0 disables top-k in transformers, as here (its default is 50).
        config = GenerationConfig(
            max_new_tokens=p.max_new_tokens,
            min_new_tokens=0,
            do_sample=not p.greedy,
            temperature=1.0 if p.greedy else p.temperature,
            top_p=1.0 if p.greedy else p.top_p,
            top_k=0 if p.greedy else p.top_k,
            min_p=0.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=list(p.stop_ids),
            pad_token_id=self.pad_id,
            num_beams=1,
            return_dict_in_generate=True,
            output_logits=True,
        )
        criteria = StoppingCriteriaList(
            [_StopStringCriteria(stops, prompt.shape[1])] if stops else []
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=rng_devices):
                if generator is not None:
                    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                    torch.manual_seed(seed)
                out = self.model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    generation_config=config,
                    stopping_criteria=criteria,
                )
        finally:
            self.model.train(was_training)
        gen = out.sequences[:, prompt.shape[1] :]  # (n, T)
        logits = torch.stack(out.logits, dim=1).float()  # (n, T, V), raw
        if not p.greedy:
            logits = logits / p.temperature
        lp = torch.log_softmax(logits, -1).gather(-1, gen[..., None]).squeeze(-1)  # (n, T)
        return [
            truncate(ids, lps, p.stop_ids, stops) for ids, lps in zip(gen.tolist(), lp.tolist())
        ]

    def generate(
        self, requests: Sequence[Request], generator: torch.Generator | None = None
    ) -> list[list[Completion]]:
        return [self._one(r, generator) for r in requests]

    def stream(
        self, request: Request, generator: torch.Generator | None = None
    ) -> Iterator[TokenEvent]:
        for index, c in enumerate(self._one(request, generator)):
            for j, (t, lp) in enumerate(zip(c.ids, c.logprobs)):
                last = j == len(c.ids) - 1
                yield TokenEvent(index, t, lp, c.finish_reason if last else None)

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        if model is not self.model:  # LoRA adapters are merged into the copied weights
            self.model.load_state_dict(lora.merged_state_dict(model))
