"""`aha sft`: supervised fine-tuning on JSONL, with the loss on completion tokens only.

Rows are ``{"prompt": str, "completion": str}`` (what `aha distill generate` writes) or
``{"messages": [...]}`` chat turns, whose last assistant turn is the completion and the rest,
rendered with the tokenizer's chat template, the prompt. A ``--data`` entry may be a file or a
directory of ``traces-*.jsonl`` shards.

Loop: each step takes ``batch_size`` sequences in a seeded per-epoch order; (1) lays them out,
padded to the longest or, with ``--pack``, packed first-fit into rows of ``pack_len`` tokens
whose position ids restart per sequence under a block-diagonal causal mask (no attention
across sequences, so the loss equals the unpacked one); (2) computes logits only at
completion positions and the token-mean cross-entropy over the step's completion tokens;
(3) steps AdamW with linear warm-up and cosine decay to 10%; (4) logs; (5) checkpoints. The
model is evaluated on held-out problems at the end (`evaluation.evaluate`).

Several processes (`accelerate launch` / `torchrun`, see ``distributed.py``): every rank draws
the same step's sequences and takes its contiguous share; the loss is the rank's sum of
cross-entropies over the *whole step's* completion-token count (known to every rank from the
sequences themselves), times W because DDP averages gradients, so the synced gradient is the
one-process gradient. Rank 0 logs, checkpoints, saves and evaluates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from rich.console import Console

from ahamoment import atomic, logprobs, training
from ahamoment.args import HeldoutArgs, LoraArgs, ModelArgs, TrainArgs, check_groups
from ahamoment.base_models import reversed_digits
from ahamoment.data import DataError, read_jsonl
from ahamoment.models import load_model, n_params
from ahamoment.progress import progress_bar
from ahamoment.runs import interruptible, interrupts_deferred
from ahamoment.schedules import warmup_cosine

IGNORE = -100


@dataclass
class SFTConfig(HeldoutArgs, LoraArgs, TrainArgs, ModelArgs):
    """Data and batching"""

    data: str = ""
    """JSONL files or trace directories, comma-separated (rows: prompt/completion, or messages)."""
    epochs: float = 3.0
    """Passes over the data (fractions allowed)."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    max_len: int = 512
    """Longest sequence (prompt + completion) in tokens; longer ones are cut at the end."""
    pack: bool = True
    """Pack a step's sequences into rows of pack_len (block-diagonal attention) instead of padding."""
    pack_len: int = 256
    """Row length when packing (a longer sequence gets a row of its own). Attention costs T² per row, so rows a few sequences long beat long rows."""
    share_prefix: bool = True
    """Run the token prefix all of a step's sequences share (e.g. the R1-Zero template) once and attend to its KV cache from every row: the same loss and gradients, less compute."""
    stream: bool = True
    """Run the step's sequences as one stream with no padding (the RL trainer's packed forward: every projection one product over all tokens, attention per sequence, the shared prefix once). Llama/Qwen2/Mistral in one process without gradient checkpointing; elsewhere, and with --no-stream, rows as set by --pack and --pack-len. Same loss and gradients."""
    # shared-group defaults that differ for this stage (docs in args.py); heldout_n 0: no
    # evaluation at the end
    warmup: int = 20
    save_every: int = 200

    def __post_init__(self) -> None:
        check_groups(self)
        if not self.data:
            raise ValueError("--data: give a JSONL file or a trace directory")
        if self.batch_size < 1 or self.epochs <= 0:
            raise ValueError("batch_size and epochs must be positive")
        if self.max_len < 2 or self.pack_len < 2:
            raise ValueError("max_len and pack_len must be at least 2 tokens")

    def paths(self) -> list[Path]:
        out: list[Path] = []
        for part in filter(None, (p.strip() for p in self.data.split(","))):
            p = Path(part)
            if p.is_dir():
                shards = sorted(p.glob("traces-*.jsonl"))
                if not shards:
                    raise FileNotFoundError(f"{p}: no traces-*.jsonl shards in this directory")
                out += shards
            elif p.exists():
                out.append(p)
            else:
                raise FileNotFoundError(f"--data: {p} does not exist")
        return out


# --- data ------------------------------------------------------------------------------------
def read_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Every row of ``paths``, checked; a bad row raises ``DataError`` naming the file, the line
    and the field. Needs no tokenizer, so `aha sft` checks its data before it writes anything."""
    rows = []
    for path in paths:
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            if "messages" in row:
                msgs = row["messages"]
                if (
                    not isinstance(msgs, list)
                    or len(msgs) < 2
                    or not all(
                        isinstance(m, dict)
                        and isinstance(m.get("content"), str)
                        and isinstance(m.get("role"), str)
                        for m in msgs
                    )
                    or msgs[-1].get("role") != "assistant"
                ):
                    raise DataError(
                        f"{where}: 'messages' must be a list of {{role, content}} turns ending "
                        "with an assistant turn (string roles and contents)"
                    )
            elif not (
                isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
            ):
                raise DataError(
                    f"{where}: expected string fields 'prompt' and 'completion', or 'messages'"
                )
            rows.append(row)
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))}: no rows")
    return rows


def to_pairs(rows: list[dict[str, Any]], tokenizer: Any) -> list[tuple[str, str]]:
    """(prompt, completion) text pairs of checked rows: chat turns before the last one are
    rendered with the tokenizer's chat template."""
    pairs = []
    for row in rows:
        if "messages" in row:
            msgs = row["messages"]
            prompt = tokenizer.apply_chat_template(
                msgs[:-1], tokenize=False, add_generation_prompt=True
            )
            pairs.append((prompt, msgs[-1]["content"]))
        else:
            pairs.append((row["prompt"], row["completion"]))
    return pairs


def load_pairs(paths: list[Path], tokenizer: Any) -> list[tuple[str, str]]:
    """(prompt, completion) text pairs; a bad row raises ``DataError`` naming file and line."""
    return to_pairs(read_rows(paths), tokenizer)


def encode_pair(
    tokenizer: Any, prompt: str, completion: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels: prompt positions carry IGNORE, completion + EOS are the targets."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + c)[:max_len]
    labels = ([IGNORE] * len(p) + c)[:max_len]
    return ids, labels


@dataclass
class Batch:
    """One step's layout: (R, T) rows; targets are already shifted (labels[t] = ids[t+1])."""

    input_ids: torch.Tensor  # (R, T)
    targets: torch.Tensor  # (R, T), IGNORE where no loss
    position_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, 1, T, P + T) bool: the prefix, then block-diagonal causal
    prefix_ids: torch.Tensor  # (P,): the prefix every sequence starts with, run once; P may be 0

    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def cells(self) -> int:
        """Token positions computed (padding included; the shared prefix once)."""
        return self.input_ids.numel() + len(self.prefix_ids)

    def pad_cells(self, seqs: list[tuple[list[int], list[int]]]) -> int:
        """Positions computed that are padding, for the sequences laid out here."""
        P = len(self.prefix_ids)
        return self.cells() - (sum(len(ids) for ids, _ in seqs) - (len(seqs) - 1) * P)


@dataclass
class StreamBatch:
    """One step's sequences for the packed forward: each cut into a head (the prefix all of
    them share, at least their first token) and the rest, which runs as one stream."""

    heads: list[list[int]]
    rests: list[list[int]]
    score_from: list[int]  # per sequence: the first token of its rest that is a target

    def n_targets(self) -> int:
        return sum(len(r) - j for r, j in zip(self.rests, self.score_from))

    def cells(self) -> int:
        """Token positions computed: each distinct head once, every rest."""
        return len({tuple(h) for h in self.heads}) * len(self.heads[0]) + sum(map(len, self.rests))

    def pad_cells(self, seqs: list[tuple[list[int], list[int]]]) -> int:
        """No padding (what the packed forward rounds up internally is not counted)."""
        return 0


def runs_as_stream(cfg: SFTConfig, model: Any, accelerator: Any) -> bool:
    """``--stream`` where the packed forward runs: a Llama-style model (not DDP-wrapped), no
    gradient checkpointing (it needs the model's own forward), parameters not sharded (FSDP
    and DeepSpeed gather them in the model's own forward, which the packed path bypasses)."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return cfg.stream and not cfg.gradient_checkpointing and not sharded and logprobs.packs(model)


def stream_layout(seqs: list[tuple[list[int], list[int]]], share_prefix: bool) -> StreamBatch:
    """The sequences as head + rest (see ``StreamBatch``); targets are where labels are set."""
    P = max(1, shared_prefix_len(seqs) if share_prefix else 0)
    score_from = []
    for ids, labels in seqs:
        # token j of the rest is ids[P + j]; the first one with a label is the first target
        first = next((j for j, t in enumerate(labels[P:]) if t != IGNORE), len(ids) - P)
        score_from.append(first)
    return StreamBatch([ids[:P] for ids, _ in seqs], [ids[P:] for ids, _ in seqs], score_from)


def _rows(seqs: list[tuple[list[int], list[int]]], pack: bool, pack_len: int) -> list[list[int]]:
    """Which sequences share a row: first-fit decreasing when packing, else one per row."""
    if not pack:
        return [[i] for i in range(len(seqs))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0])
        for r in range(len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(pack_len, n) - n)
    return rows


MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are not worth a separate forward."""


def shared_prefix_len(seqs: list[tuple[list[int], list[int]]]) -> int:
    """Tokens every sequence starts with, none of them (nor the token after) a target, and at
    least one token left in each sequence; 0 when under MIN_SHARED_PREFIX."""
    first = seqs[0][0]
    n = min(len(ids) for ids, _ in seqs) - 1
    for ids, labels in seqs:
        # position j predicts labels[j + 1]: a prefix of P positions needs labels[1..P] ignored
        free = next((j for j, t in enumerate(labels) if t != IGNORE), len(labels)) - 1
        n = min(n, free)
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    pack: bool,
    pack_len: int,
    share_prefix: bool = False,
) -> Batch:
    """Rows of the sequences (padded, or packed first-fit), targets shifted.

    With ``share_prefix``, the prefix all sequences share (e.g. the R1-Zero template) is cut
    off and returned once (``prefix_ids``); every row attends to it through a shared KV cache
    (see `sft_loss`), and positions continue after it.
    """
    P = shared_prefix_len(seqs) if share_prefix else 0
    rests = [(ids[P:], labels[P:]) for ids, labels in seqs]
    layout = _rows(rests, pack, pack_len)
    T = max(sum(len(rests[i][0]) for i in row) for row in layout)
    R = len(layout)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    targets = torch.full((R, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    seg = torch.full((R, T), -1, dtype=torch.long)  # sequence index per position; -1 pad
    for r, row in enumerate(layout):
        at = 0
        for i in row:
            s_ids, s_lab = rests[i]
            n = len(s_ids)
            ids[r, at : at + n] = torch.tensor(s_ids)
            # next-token targets within the sequence only: the last position predicts nothing
            targets[r, at : at + n - 1] = torch.tensor(s_lab[1:])
            pos[r, at : at + n] = P + torch.arange(n)
            seg[r, at : at + n] = i
            at += n
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)  # (R, T, T)
    mask = same & causal
    mask |= torch.eye(T, dtype=torch.bool)  # pad rows attend to themselves: no NaN
    mask = torch.cat([torch.ones((R, T, P), dtype=torch.bool), mask], dim=2)  # (R, T, P + T)
    prefix = torch.tensor(seqs[0][0][:P], dtype=torch.long)
    return Batch(ids, targets, pos, mask[:, None], prefix)


def n_targets(seqs: list[tuple[list[int], list[int]]]) -> int:
    """Completion tokens that carry a loss in ``seqs`` (as ``collate`` lays them out)."""
    return sum(sum(t != IGNORE for t in labels[1:]) for _, labels in seqs)


def sft_loss(
    model: Any, batch: Batch | StreamBatch, denominator: float | None = None, pad_id: int = 0
) -> torch.Tensor:
    """Token-mean cross-entropy over the batch's completion tokens; with ``denominator``, their
    summed cross-entropy over it (a rank's share of a loss over a larger batch).

    A ``StreamBatch`` runs through the trainer's packed log-probs (``logprobs``), which score
    only the targets; a ``Batch`` (rows) as follows.

    Logits are computed only where there is a target: the LM head and softmax skip prompts
    and padding. A shared prefix runs once (one row), and its KV cache is gathered to every row
    with a differentiable index, so its gradient is the sum over rows: the same loss and
    gradients as running it in every row (a test checks both).
    """
    if isinstance(batch, StreamBatch):
        logp, mask, _ = logprobs.completion_logprobs(
            model, batch.heads, batch.rests, pad_id=pad_id, score_from=batch.score_from
        )
        total = -(logp * mask).sum()
        return total / (mask.sum() if denominator is None else denominator)
    device = next(model.parameters()).device
    batch = Batch(*(t.to(device) for t in vars(batch).values()))
    base = getattr(model, "model", None)
    keep = batch.targets != IGNORE  # (R, T)
    # the split needs the HF layout (a DDP or peft wrapper hides it: one plain forward then)
    split = base is not None and hasattr(model, "lm_head") and hasattr(base, "layers")
    net = base if split else model
    kwargs: dict[str, Any] = {}
    P = len(batch.prefix_ids)
    if P:
        out = net(
            input_ids=batch.prefix_ids[None],
            position_ids=torch.arange(P, device=device)[None],
            use_cache=True,
        )
        # transformers >= 5.2x names the KV cache ``cache``, earlier 5.x ``past_key_values``
        key = "cache" if hasattr(out, "cache") else "past_key_values"
        cache = getattr(out, key)
        rows = torch.zeros(batch.input_ids.shape[0], dtype=torch.long, device=device)
        cache.batch_select_indices(rows)  # (1, ...) -> (R, ...), differentiable gather
        kwargs = {key: cache, "use_cache": True}
    out = net(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        **kwargs,
    )
    if split:
        logits = model.lm_head(out.last_hidden_state[keep])  # (N, V)
    else:  # any causal LM without the usual base/head split
        logits = out.logits[keep]
    if denominator is None:
        return torch.nn.functional.cross_entropy(logits.float(), batch.targets[keep])
    ce = torch.nn.functional.cross_entropy(logits.float(), batch.targets[keep], reduction="sum")
    return ce / denominator


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of optimizer step ``step``: a resumed run draws exactly what it would have."""
    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, per_epoch)
    return epoch_order(n, seed, epoch)[k * batch_size : (k + 1) * batch_size]


def total_steps(n: int, cfg: SFTConfig) -> int:
    return max(1, math.ceil(cfg.epochs * math.ceil(n / cfg.batch_size)))


# --- the stage -------------------------------------------------------------------------------
def sft(cfg: SFTConfig, console: Console | None = None) -> dict[str, Any]:
    t_start = time.time()
    rows = read_rows(cfg.paths())  # bad data stops the run before anything is written
    tr = training.start(cfg, "sft", console)
    run, ranks, console, tokenizer = tr.run, tr.ranks, tr.console, tr.tokenizer
    accelerator, model = tr.accelerator, tr.model
    examples = [encode_pair(tokenizer, p, c, cfg.max_len) for p, c in to_pairs(rows, tokenizer)]
    steps = total_steps(len(examples), cfg)
    console.print(
        f"[bold]Run:[/] {run}   model {tr.base_path} ({n_params(model):,} parameters)   "
        f"{len(examples):,} examples, {steps} steps"
        + (f", {ranks.world} processes" if ranks.world > 1 else "")
    )
    # fused: one kernel over every parameter, as aha zero's, instead of a few ops per tensor
    # (faster on CPU: docs/results/performance.md)
    optimizer = training.adamw(model, cfg, betas=training.LM_BETAS, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=cfg.warmup, total=steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    state = tr.restore(optimizer, scheduler)
    step, train_s, tokens = state["step"], state.get("train_s", 0.0), state.get("tokens", 0)
    if ranks.main:
        run.cut_after("metrics.jsonl", step)

    def on_interrupt() -> None:
        tr.save(step, model, optimizer, scheduler, train_s=train_s, tokens=tokens)
        console.print(
            f"[yellow]Interrupted: saved step {step}. Resume: aha sft --out {run} --resume"
        )

    model.train()
    stream = runs_as_stream(cfg, model, accelerator)
    with progress_bar(console) as bar, interruptible(on_interrupt):
        bar_id = bar.add_task("aha sft", total=steps, completed=step, info="")
        while step < steps:
            t0 = time.time()
            # 1. layout: padded or packed rows of this rank's share of the step's sequences
            seqs = [
                examples[i] for i in step_indices(len(examples), cfg.batch_size, cfg.seed, step)
            ]
            mine = [seqs[i] for i in ranks.piece(len(seqs))]
            # a rank without sequences runs one with weight 0: every rank syncs gradients
            weight = float(ranks.world) if mine else 0.0
            if stream:
                batch = stream_layout(mine or seqs[:1], cfg.share_prefix)
            else:
                batch = collate(
                    mine or seqs[:1],
                    tokenizer.pad_token_id,
                    cfg.pack,
                    cfg.pack_len,
                    # checkpointed layers run without a KV cache: nothing to share then
                    cfg.share_prefix and not cfg.gradient_checkpointing,
                )
            # 2. loss on completion tokens only, over the whole step's token count
            loss = sft_loss(
                model, batch, denominator=max(1, n_targets(seqs)), pad_id=tokenizer.pad_token_id
            )
            # 3. optimizer step
            accelerator.backward(loss * weight)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            # stepped, counted and logged together: a Ctrl-C waits for the row (the saved
            # step is then the one the weights are at, and its row is written)
            with interrupts_deferred():
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                n_tok = sum(len(s[0]) for s in seqs)
                loss_sum, pads, cells = ranks.sum(
                    [loss.item(), batch.pad_cells(mine), batch.cells()] if mine else [0.0, 0, 0]
                )
                dt = time.time() - t0
                train_s += dt
                tokens += n_tok
                # 4. log
                row = {
                    "step": step,
                    "loss": loss_sum,
                    "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                    "lr": scheduler.get_last_lr()[0],
                    "tok_s": n_tok / max(dt, 1e-9),
                    "pad_share": pads / max(cells, 1.0),
                }
                if ranks.main:
                    run.append("metrics.jsonl", row)
            bar.update(bar_id, advance=1, info=f"loss {row['loss']:.3f}")
            # 5. checkpoint
            if cfg.save_every and step % cfg.save_every == 0 and step < steps:
                tr.save(step, model, optimizer, scheduler, train_s=train_s, tokens=tokens)

    final_dir = tr.save_final(model)
    summary: dict[str, Any] = {}
    if ranks.main:  # the other ranks wait for the summary at the broadcast below
        final = load_model(final_dir).to(accelerator.device)  # evaluate what was saved
        summary = {
            "steps": steps,
            "examples": len(examples),
            "train_s": round(train_s, 2),
            "train_tok_s": tokens / max(train_s, 1e-9),
            "model": str(tr.base_path),
        }
        summary.update(evaluate_final(final, tokenizer, cfg, reversed_digits(tr.base_path)))
        summary["wall_s"] = round(time.time() - t_start, 1)
        atomic.write_json(run / "summary.json", summary)
        h = summary.get("heldout")
        if h:
            console.print(
                f"held-out pass@1 {h['pass1']:.3f}  greedy {h['greedy_acc']:.3f}  "
                f"mean length {h['mean_len']:.1f}   train {train_s:.0f} s"
            )
    return ranks.broadcast(summary)


def evaluate_final(
    model: Any, tokenizer: Any, cfg: SFTConfig, reversed_digits: bool = False
) -> dict[str, Any]:
    """Held-out (and real Countdown) figures of ``model`` with the config's eval settings."""
    if not cfg.heldout_n:
        return {}
    held = cfg.heldout_set(model, tokenizer, cfg.task, reversed_digits=reversed_digits)
    out: dict[str, Any] = {"heldout": held.run(held.problems, 0)}
    if cfg.real_eval and cfg.task.startswith("countdown"):
        out["real"] = held.real()
    return out


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("sft", argv)


if __name__ == "__main__":
    raise SystemExit(main())
