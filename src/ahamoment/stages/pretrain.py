"""`aha pretrain`: build the embedded base model that R1-Zero starts from.

Loop: write a synthetic corpus of noisy solution traces (rendered in the R1-Zero template),
train a BPE tokenizer on it, then train a tiny Llama with next-token prediction on packed
blocks. The result is cached under a key that hashes the corpus generator's config and
version, the model shape and the training budget, so a changed corpus never reuses a stale
model, with a manifest that says how to rebuild it. The bases the README's commands start from
are shipped with the package (``base_models.py``); ``aha pretrain`` with their settings rebuilds
them and says whether the rebuild matches the shipped weights bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from ahamoment import atomic
from ahamoment.base_models import compare_with_shipped, write_manifest
from ahamoment.data import sample_excluding
from ahamoment.language import bilingual_tokens
from ahamoment.models import (
    build_tokenizer,
    cache_dir,
    load_tokenizer,
    n_params,
    new_model,
    save_model,
    set_threads,
    tiny_llama_config,
)
from ahamoment.progress import progress_bar
from ahamoment.prompts import r1_zero_prompt
from ahamoment.rewards import judge
from ahamoment.schedules import warmup_cosine
from ahamoment.splits import excluded
from ahamoment.tasks import get_task
from ahamoment.tasks.base import TraceNoise
from ahamoment.training import LM_BETAS

CORPUS_VERSION = 4
"""Bump when the trace grammar or the corpus generator changes: it invalidates cached models."""


@dataclass
class PretrainConfig:
    task: str = "countdown"
    """Task whose noisy solution traces make up the corpus (see `aha zero --help` for tasks)."""
    tokens: int = 4_000_000
    """Training tokens (packed blocks x block length x steps)."""
    corpus_docs: int = 80_000
    """Number of synthetic documents (prompt + noisy trace) generated for the corpus."""
    p_give_up: float = 0.6
    """Corpus noise: after each missed try, give up and guess with this probability."""
    p_false_hit: float = 0.2
    """Corpus noise: on a miss, claim a hit anyway (arithmetic stays correct)."""
    p_check: float = 0.25
    """Corpus noise: after a claimed hit, recompute the last step on a 'wait,check:' line."""
    p_drop_tags: float = 0.1
    """Corpus noise: drop the <think>/<answer> tags of a trace."""
    p_guess: float = 0.0
    """Corpus noise: on giving up, answer a random candidate (else the last try)."""
    p_foreign: float = 0.0
    """Corpus language mixing: write each reasoning line in the second language (language.py:
    same steps, other symbols, equal token length) with this probability; `aha r1` uses 0.3."""
    search_ops: str = ""
    """Corpus: operators the traces' tries use (empty: all of the task's; "+-" keeps every
    step a plain addition or subtraction)."""
    inline_target: bool = True
    """Corpus: end each try with "|target" before its verdict; false makes the verdict recall
    the target from the prompt, and only 'wait,check:' lines compare adjacently."""
    guess_first: bool = False
    """Corpus: each try claims a candidate ("try:58+82-4=45"), then commits to it or, with
    p_check, computes it on a 'wait,check:' line; a rejected guess is followed by another."""
    check_by_difference: bool = True
    """Corpus (Countdown tries): a 'wait,check:' line subtracts the smaller of result and target
    from the larger (16-15=1,no) instead of recomputing the last step and comparing (15|16,no),
    so the verdict rests on a subtraction rather than on telling two near numbers apart."""
    reversed_digits: bool = False
    """Corpus: write the reasoning's numbers least-significant digit first (the answer stays
    standard): each digit then depends only on digits already written and the carry."""
    search_order: str = "random"
    """Corpus (Countdown): the order of a trace's tries: "random" (every left-to-right chain,
    shuffled) or "strategy" (sums and differences of the numbers largest first, then a product
    or quotient of two, then a bracketed sum times a third; tasks/countdown.py)."""
    named_tries: bool = False
    """Corpus (Countdown): start each try with its expression in standard digits
    ("58+82-4:85+28=041,...") so the answer copies it rather than turning reversed digits back."""
    p_template: float = 0.25
    """Share of documents whose prompt is the full R1-Zero template (the rest: "User: … Assistant:")."""
    vocab_size: int = 512
    """BPE vocabulary size (digits and operators stay single characters)."""
    hidden: int = 128
    """Model width."""
    layers: int = 4
    """Transformer layers."""
    heads: int = 4
    """Attention heads."""
    intermediate: int = 384
    """MLP width."""
    block: int = 256
    """Packed training sequence length in tokens."""
    batch_size: int = 8
    """Blocks per optimizer step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup: int = 100
    """Warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    seed: int = 0
    """Seed for the corpus, the initial weights and the batch order."""
    threads: int = 0
    """torch CPU threads; 0 uses every core this process may run on (use 1 on a busy machine)."""
    out: str = ""
    """Where to write the model; empty means the cache ($AHAMOMENT_CACHE or ~/.cache/ahamoment)."""
    force: bool = False
    """Rebuild from scratch even when a cached (or half-built) model with the same key exists."""
    save_every: int = 200
    """Save a resume point every N optimizer steps (Ctrl-C saves one too)."""

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in (
            "p_give_up",
            "p_false_hit",
            "p_check",
            "p_drop_tags",
            "p_template",
            "p_guess",
            "p_foreign",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if set(self.search_ops) - set("+-*/"):
            raise ValueError(f"search_ops must be a subset of '+-*/', got {self.search_ops!r}")
        from ahamoment.tasks.countdown import SEARCH_ORDERS

        SEARCH_ORDERS.get(self.search_order)  # an unknown name is one line naming the choices
        if self.tokens < self.block * self.batch_size:
            raise ValueError("tokens must cover at least one batch (block x batch_size)")

    def noise(self) -> TraceNoise:
        # by name: every TraceNoise field has a config field of the same name
        return TraceNoise(**{f.name: getattr(self, f.name) for f in fields(TraceNoise)})

    def cache_key(self) -> str:
        ignored = ("threads", "out", "force", "save_every")
        keyed = {k: v for k, v in asdict(self).items() if k not in ignored}
        # added later: models built without them keep their cache keys
        for name, default in (
            ("p_foreign", 0.0),
            ("search_ops", ""),
            ("inline_target", True),
            ("guess_first", False),
            ("reversed_digits", False),
            ("search_order", "random"),
            ("named_tries", False),
            ("check_by_difference", False),
        ):
            if keyed[name] == default:
                del keyed[name]
        keyed["task_version"] = getattr(get_task(self.task), "version", 1)
        keyed["corpus_version"] = CORPUS_VERSION
        blob = json.dumps(keyed, sort_keys=True).encode()
        return f"{self.task}-{hashlib.sha256(blob).hexdigest()[:12]}"

    def output_dir(self) -> Path:
        return Path(self.out) if self.out else cache_dir() / "models" / self.cache_key()

    def steps(self) -> int:
        return max(1, self.tokens // (self.block * self.batch_size))


def make_corpus(cfg: PretrainConfig) -> tuple[list[str], dict[str, float]]:
    """Documents (prompt + noisy trace), decontaminated against held-out and real problems."""
    task = get_task(cfg.task)
    exclude = excluded(cfg.task)
    rng = random.Random(cfg.seed)
    noise = cfg.noise()
    docs, correct, formatted = [], 0, 0
    for _ in range(cfg.corpus_docs):
        problem = sample_excluding(task, rng, exclude)
        completion = task.trace(problem, rng, noise)
        answer, verdict = judge(problem, completion)
        correct += int(verdict.correct)
        formatted += int("</think>" in completion and "<answer>" in completion)
        # The constant R1-Zero preamble carries no information, so only a share of documents
        # pays its ~60 tokens; the rest use the bare "User: … Assistant:" turn it ends with.
        if rng.random() < cfg.p_template:
            prompt = r1_zero_prompt(problem.question)
        else:
            prompt = f"User: {problem.question} Assistant:"
        docs.append(prompt + completion)
    n = max(1, len(docs))
    return docs, {"corpus_accuracy": correct / n, "corpus_format_rate": formatted / n}


def pretrain(cfg: PretrainConfig, console=None) -> Path:
    """Build (or reuse) the base model; returns its directory.

    Work in progress lives in ``<out>.tmp`` with a resume checkpoint every ``save_every``
    steps, so an interrupted build continues where it stopped when run again. The resume file
    is replaced atomically (its tokenizer is on disk before the first one), one that cannot be
    read starts the build over with a warning, and ``<out>`` appears only once complete.
    """
    out = cfg.output_dir()
    if (out / "config.json").exists() and not cfg.force:
        return out
    set_threads(cfg.threads)
    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    resume_file = tmp / "resume.pt"
    if cfg.force and tmp.exists():
        shutil.rmtree(tmp)

    # corpus and tokenizer (the corpus is seeded; the tokenizer is saved with the first checkpoint)
    docs, corpus_stats = make_corpus(cfg)
    state = _read_resume(resume_file, console)
    if state is not None:
        tokenizer = load_tokenizer(tmp)
    else:
        # BPE sees the whole template thousands of times, so its merges cover it.
        tokenizer = build_tokenizer(
            docs[:20_000] + [r1_zero_prompt("")] * 2000,
            cfg.vocab_size,
            bilingual_tokens() if cfg.p_foreign else (),
        )
    eos = tokenizer.eos_token
    ids = tokenizer([d + eos for d in docs], add_special_tokens=False, return_attention_mask=False)
    stream = torch.from_numpy(np.fromiter(chain.from_iterable(ids["input_ids"]), dtype=np.int64))
    n_blocks = (len(stream) - 1) // cfg.block
    # (n_blocks, block + 1): inputs are [:, :-1], targets [:, 1:]; blocks overlap by one token
    blocks = stream[: n_blocks * cfg.block + 1].unfold(0, cfg.block + 1, cfg.block)

    model_cfg = tiny_llama_config(
        tokenizer, cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, max_positions=1024
    )
    model = new_model(model_cfg, cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=LM_BETAS
    )
    steps = cfg.steps()

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=cfg.warmup, total=steps)
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start = state["step"]
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)

    def save_progress(step: int) -> None:
        if not resume_file.exists():  # the first resume point: its tokenizer goes first
            tokenizer.save_pretrained(str(tmp))
            atomic.fsync_tree(tmp)
        blob = {
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": gen.get_state(),
            "step": step,
        }
        buf = io.BytesIO()
        torch.save(blob, buf)
        atomic.write_checked(resume_file, buf.getvalue())  # whole, and checked when read

    model.train()
    loss_val = float("nan")
    step = start
    try:
        with progress_bar(console) as bar:
            task_id = bar.add_task("pretrain", total=steps, completed=start, info="")
            while step < steps:
                batch = blocks[torch.randint(0, len(blocks), (cfg.batch_size,), generator=gen)]
                logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
                )
                accelerator.backward(loss)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_val = loss.item()
                bar.update(task_id, advance=1, info=f"loss {loss_val:.3f}")
                if cfg.save_every and step % cfg.save_every == 0 and step < steps:
                    save_progress(step)
    except KeyboardInterrupt:
        save_progress(step)
        raise

    model = accelerator.unwrap_model(model)
    save_model(model, tokenizer, tmp)
    meta = {
        "task": cfg.task,
        "params": n_params(model),
        "corpus_docs": len(docs),
        "corpus_tokens": int(len(stream)),
        "train_tokens": steps * cfg.batch_size * cfg.block,
        "final_loss": loss_val,
        "wall_s": round(time.time() - t0, 1),
        "resumed_at_step": start or None,
        "config": asdict(cfg),
        "corpus_version": CORPUS_VERSION,
        **corpus_stats,
    }
    (tmp / "ahamoment_pretrain.json").write_text(json.dumps(meta, indent=1))
    resume_file.unlink(missing_ok=True)
    write_manifest(tmp, cfg)  # how to rebuild it, and the sha256 of every file
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.publish_dir(tmp, out)  # fsynced, then renamed: <out> is never half there
    same = compare_with_shipped(out, cfg.cache_key())
    if same and console is not None:
        console.print(f"Built {same}.")
    return out


def _read_resume(path: Path, console) -> dict | None:
    """The resume point at ``path``; None when there is none, or (with a warning) when it
    cannot be read: the build then starts over."""
    if not path.exists():
        return None
    try:
        state = torch.load(io.BytesIO(atomic.read_checked(path)), weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step in it")
        return state
    except Exception as e:  # noqa: BLE001 - any unreadable resume point means starting over
        if console is not None:
            console.print(
                f"warning: resume point {path} is unreadable ({atomic.describe(e)}); building "
                "from the start",
                style="yellow",
                markup=False,
                soft_wrap=True,
            )
        shutil.rmtree(path.parent, ignore_errors=True)
        return None


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("pretrain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
