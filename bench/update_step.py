"""One whole GRPO policy update of the README recipe, with old-policy log-probs from a trainer
forward or from the sampler, side by side.

The README recipe makes two optimizer steps per rollout batch, so the ratio of its second step
needs the log-probs of the policy before the first. ``forward``: one no-grad forward of the
policy over the batch (``OLD_LOGP["forward"]``); ``sampler``: the log-probs the sampler drew each
token with (``OLD_LOGP["sampler"]``), no forward. Both sides time what `aha zero` runs between
the rollout and the next one: the reference forward, the old log-probs, the advantages and
both optimizer steps (``anchor`` + ``policy_update``), on the shipped embedded base with the
recipe's rank-8 adapters, over rollout batches of 16 prompts x 8 completions sampled by the
torch engine from that very model. The sides alternate ``--repeats`` times on the same batches,
each from the same starting weights; each timing is the median of ``--steps`` updates after
one warm-up. The speedup is the median of the ratios of back-to-back pairs.

    python bench/update_step.py                 # ~2 min
    python bench/update_step.py --threads 2     # as aha zero runs on 2 cores
    python bench/update_step.py --quick         # smoke

The last line is ``old_logp_speedup=X``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from dataclasses import replace

import torch
from accelerate import Accelerator

from ahamoment import lora, training
from ahamoment.base_models import shipped_model
from ahamoment.models import load_model, load_tokenizer
from ahamoment.prompts import encode_prompts, stop_ids
from ahamoment.rl.advantages import ADVANTAGES
from ahamoment.rl.rollouts import Rollout
from ahamoment.rl.update import TrainBatch, anchor, policy_update
from ahamoment.rollout import Request, SamplingParams, TorchEngine
from ahamoment.stages.pretrain import PretrainConfig
from ahamoment.stages.zero import ZeroConfig
from ahamoment.tasks import get_task


def rollouts(base, tokenizer, cfg: ZeroConfig, seed: int) -> Rollout:
    """P prompts x G completions sampled from the base, as a step of `aha zero` samples them."""
    task, rng = get_task(cfg.task), random.Random(seed)
    problems = [task.sample(rng) for _ in range(cfg.prompts_per_step)]
    prompts = encode_prompts(tokenizer, problems)
    params = SamplingParams(cfg.temperature, cfg.top_p, 0, cfg.max_new_tokens, stop_ids(tokenizer))
    groups = TorchEngine(load_model(base).eval(), tokenizer).generate(
        [Request(p, params, cfg.group_size) for p in prompts], torch.Generator().manual_seed(seed)
    )
    rows = [i for i in range(len(prompts)) for _ in range(cfg.group_size)]
    return Rollout(
        [problems[i] for i in rows],
        [list(prompts[i]) for i in rows],
        [c for g in groups for c in g],
    )


def time_side(start, ref, batches, cfg: ZeroConfig, source: str) -> float:
    """Median seconds of one update (anchor + policy_update) with old log-probs from ``source``."""
    settings = replace(cfg.update_settings(0), old_logp=source)
    times = []
    for i, batch in enumerate(batches):
        model = copy.deepcopy(start).train()
        optimizer = training.adamw(model, cfg, betas=training.RL_BETAS, fused=True)
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        # rewards of any spread: the update's cost does not depend on their values
        rewards = torch.tensor([float(j % 3 == 0) for j in range(len(batch))])
        t = time.perf_counter()
        a = anchor(model, ref, batch, rewards, settings, cfg.kl_placement)
        adv = ADVANTAGES.get(cfg.advantage)(a.rewards, cfg.group_size)  # (B,)
        in_loss = torch.ones(len(batch), dtype=torch.bool)
        tb = TrainBatch(batch, adv, in_loss, a.old_logp, a.ref_logp)
        policy_update(
            model, optimizer, accelerator, tb, settings.with_kl(a.loss_kl), torch.Generator()
        )
        if i:  # the first update warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="Alternations of the two sides.")
    ap.add_argument("--steps", type=int, default=3, help="Timed updates per side and repeat.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads.")
    ap.add_argument("--quick", action="store_true", help="Smoke test: 1 repeat of 1 update.")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ZeroConfig()  # the README recipe
    if cfg.minibatches < 2:
        raise SystemExit("the recipe makes one step per batch: no old log-probs to compare")
    base = shipped_model(PretrainConfig().cache_key())
    if base is None:
        raise SystemExit("the shipped default base is missing: reinstall ahamoment")
    tokenizer = load_tokenizer(base)
    start = lora.load_policy(base, None, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    ref = load_model(base).eval().requires_grad_(False)
    batches = [rollouts(base, tokenizer, cfg, s) for s in range(args.steps + 1)]
    tokens = sum(len(c.ids) for c in batches[0].completions)
    ratios, rows = [], []
    for r in range(args.repeats):
        fwd = time_side(start, ref, batches, cfg, "forward")
        samp = time_side(start, ref, batches, cfg, "sampler")
        ratios.append(fwd / samp)
        rows.append((r, fwd, samp))
    print(
        f"update: {len(batches[0])} rows, {tokens} completion tokens in the first, "
        f"{cfg.minibatches} optimizer steps, rank {cfg.lora_rank}; {args.threads} thread(s)"
    )
    print("repeat  old by forward (s)  old from sampler (s)  ratio")
    for r, a, b in rows:
        print(f"{r:>6}  {a:>18.3f}  {b:>20.3f}  {a / b:.2f}")
    print(f"old_logp_speedup={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
