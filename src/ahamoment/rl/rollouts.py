"""GRPO rollout batches: P prompts x G completions, sampled, scored and summarised.

A :class:`Rollout` holds ``B = P * G`` rows; consecutive rows of a group share a prompt.
:func:`sample_groups` draws fresh training prompts (never a held-out or benchmark problem),
samples a group of completions for each through a rollout engine, scores them with the
weighted rewards, and refills groups that the group filter drops (DAPO dynamic sampling).

Several processes: every rank draws the same P problems; they are cut into seed blocks
(``seed_block`` prompts each) dealt to the ranks; block b of round k is sampled under a
generator seeded by (one draw from the step's generator, k, b) on the rank it is dealt to,
scored there, and the scored blocks are gathered in block order. Every rank thus returns the
same batch, equal to what one process would sample.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ahamoment.data import sample_excluding
from ahamoment.distributed import Ranks, seed_blocks, seeded_generator
from ahamoment.evaluation import generate, ratio_of_sums, rejections
from ahamoment.logprobs import completion_logprobs
from ahamoment.metrics import (
    has_reflection,
    is_self_correction,
    length_stats,
    mixing_rate,
    step_accuracy,
    tries,
)
from ahamoment.prompts import encode_prompts
from ahamoment.rewards import RewardBatch, format_reward, score, task_stats
from ahamoment.rl.advantages import count_constant_groups
from ahamoment.rl.shaping import GROUP_FILTERS
from ahamoment.rollout import Completion, Engine, SamplingParams
from ahamoment.tasks.base import Problem, Task


@dataclass
class Rollout:
    """One rollout batch: B rows, consecutive rows of a group share a prompt."""

    problems: list[Problem]
    prompts: list[list[int]]
    """B prompt id lists."""
    completions: list[Completion]
    """B decoded completions: ids, text, sampler log-probs, finish reason."""
    rewards: RewardBatch | None = None
    """Their rewards, once scored."""

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> list[int]:
        return [len(c.ids) for c in self.completions]

    @property
    def texts(self) -> list[str]:
        return [c.text or "" for c in self.completions]

    def select(self, rows: Sequence[int]) -> Rollout:
        """The given rows, in order (e.g. the groups a filter kept)."""
        rb = self.rewards
        return Rollout(
            problems=[self.problems[r] for r in rows],
            prompts=[self.prompts[r] for r in rows],
            completions=[self.completions[r] for r in rows],
            rewards=None if rb is None else rb.select(rows),
        )

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """Rows of several rollouts, one after another (reward errors are summed)."""
        rbs = [p.rewards for p in parts if p.rewards is not None]
        return Rollout(
            problems=[x for p in parts for x in p.problems],
            prompts=[x for p in parts for x in p.prompts],
            completions=[x for p in parts for x in p.completions],
            rewards=RewardBatch.concat(rbs) if rbs else None,
        )

    def logprobs(self, net, rows: Sequence[int], temperature: float, pad_id: int, entropy=False):
        """Trainer log-probs (b, Lc) of ``rows``, padded to the longest completion among
        them (Lc <= the batch's width: a full-batch tensor sliced to ``[:, :Lc]`` lines up)."""
        return completion_logprobs(
            net,
            [self.prompts[r] for r in rows],
            [self.completions[r].ids for r in rows],
            temperature,
            pad_id,
            entropy,
        )

    def sampler_logprobs(self, rows: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """The sampler's log-probs of ``rows``, laid out like ``like`` (b, Lc), zero-padded."""
        out = torch.zeros_like(like)
        for j, r in enumerate(rows):
            lp = self.completions[r].logprobs
            out[j, : len(lp)] = torch.tensor(lp)
        return out


@dataclass(frozen=True)
class RolloutSettings:
    """How a step's rollouts are drawn (`aha zero` builds these from its config)."""

    prompts: int
    """P: distinct prompts per sampling round."""
    group_size: int
    """G: completions per prompt."""
    params: SamplingParams
    """Sampling settings of every completion."""
    weights: dict[str, float]
    """Reward name -> weight."""
    seed_block: int = 0
    """Prompts sampled under one seed; 0: P / processes (see ``default_seed_block``)."""
    group_filter: str = "all"
    """Groups kept for training (``rl/shaping.py``)."""
    max_rounds: int = 1
    """Sampling rounds at most, refilling dropped groups."""


@dataclass(frozen=True)
class PromptSource:
    """Where training prompts come from: a task, minus the problems never to train on."""

    task: Task
    exclude: frozenset[str]

    def draw(self, rng: random.Random) -> Problem:
        return sample_excluding(self.task, rng, self.exclude)


def step_rng(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """Per-step RNGs derived from (seed, step): a resumed run draws exactly what it would have."""
    mixed = seed * 1_000_003 + step
    return random.Random(mixed), torch.Generator().manual_seed(mixed)


def default_seed_block(prompts: int, world: int) -> int:
    """The largest divisor of ``prompts`` that gives every one of ``world`` ranks a block."""
    return max(
        d for d in range(1, prompts + 1) if prompts % d == 0 and d * min(world, prompts) <= prompts
    )


def sample_groups(
    engine: Engine,
    tokenizer: Any,
    source: PromptSource,
    settings: RolloutSettings,
    rng: random.Random,
    gen: torch.Generator,
    ranks: Ranks | None = None,
) -> tuple[Rollout, Rollout, dict[str, int]]:
    """Rollout and reward for P fresh prompts x G samples, refilled while the group filter
    drops groups, for at most ``settings.max_rounds`` rounds (see the module docstring).

    Returns the batch to train on (at most P groups; fewer when the cap is hit), everything
    sampled this step (for unbiased rollout metrics), and the round and drop counts.
    """
    ranks = ranks or Ranks()
    keep_fn = GROUP_FILTERS.get(settings.group_filter)
    G, P = settings.group_size, settings.prompts
    blocks = seed_blocks(P, settings.seed_block or default_seed_block(P, ranks.world))
    base_seed = int(torch.randint(0, 2**62, (1,), generator=gen))  # same on every rank
    rounds, dropped, kept, everything = 0, 0, [], []
    while len(kept) < P and rounds < settings.max_rounds:
        rounds += 1
        problems = [source.draw(rng) for _ in range(P)]
        prompt_ids = encode_prompts(tokenizer, problems)
        mine = []
        for b in ranks.piece(len(blocks)):
            rows = [i for i in blocks[b] for _ in range(G)]  # prompt index of each row
            prompts = [prompt_ids[i] for i in rows]
            block_gen = seeded_generator(base_seed, rounds, b)
            block = Rollout(
                problems=[problems[i] for i in rows],
                prompts=prompts,
                completions=generate(engine, tokenizer, prompts, settings.params, block_gen),
            )
            block.rewards = score(block.problems, block.texts, settings.weights)
            mine.append(block)
        part = Rollout.concat([blk for theirs in ranks.gather(mine) for blk in theirs])
        everything.append(part)
        keep = keep_fn(torch.tensor(part.rewards.total), G)  # (P,)
        dropped += int((~keep).sum())
        kept += [(part, i) for i in range(P) if keep[i]]
    kept = kept[:P]
    if not kept:  # every group was dropped: train on the last round (zero advantage anyway)
        kept = [(everything[-1], i) for i in range(P)]
    train = Rollout.concat([part.select(range(i * G, (i + 1) * G)) for part, i in kept])
    return (
        train,
        Rollout.concat(everything),
        {"sampling_rounds": rounds, "groups_dropped": dropped, "groups_trained": len(kept)},
    )


def _mean_where(values, mask) -> float | None:
    """Mean of ``values`` where ``mask`` is true; None where it never is."""
    picked = [float(v) for v, m in zip(values, mask) if m]
    return sum(picked) / len(picked) if picked else None


def rollout_metrics(batch: Rollout, group_size: int, reversed_digits: bool = False) -> dict:
    """Rollout figures of a scored batch (rewards before any overlong or KL shaping), plus
    the task's own figures as ``task/<key>`` where it has ``batch_stats`` (tasks/base.py)."""
    B = len(batch)
    rb, texts = batch.rewards, batch.texts
    lens = length_stats(batch.lengths)
    reflects = [has_reflection(t) for t in texts]
    return {
        "reward": sum(rb.total) / B,
        **{f"reward/{k}": sum(v) / B for k, v in rb.components.items()},
        "reward_errors": sum(rb.errors.values()),
        "accuracy": sum(rb.correct) / B,
        "format_rate": sum(
            rb.components["format"]
            if "format" in rb.components
            else [format_reward(p, t) for p, t in zip(batch.problems, texts)]
        )
        / B,
        "parse_fail_rate": sum(rb.parse_fail) / B,
        "constant_groups": count_constant_groups(torch.tensor(rb.total), group_size),
        "len_mean": lens["mean"],
        "len_p90": lens["p90"],
        "truncated_rate": [c.finish_reason for c in batch.completions].count("length") / B,
        "reflection_rate": sum(reflects) / B,
        "self_correction_rate": sum(map(is_self_correction, texts)) / B,
        # is the search real: attempts per completion, checks among correct completions, and
        # the share of check-rejected attempts that the verifier rejects too
        "tries_mean": sum(len(tries(t)) for t in texts) / B,
        "reflection_correct_rate": _mean_where(reflects, rb.correct),
        "check_precision": ratio_of_sums([rejections(p, t) for p, t in zip(batch.problems, texts)]),
        "step_accuracy": step_accuracy(texts, reversed_digits),
        "mixing_rate": mixing_rate(texts),
        **task_stats(batch.problems, texts),  # task/<key>: a task's own figures, if it has any
    }
