"""SFT speed: `aha sft` against TRL's SFTTrainer, same model, data and settings, one thread.

Both sides fine-tune the same randomly initialised Llama (``--hidden``/``--layers``; the
default is about 3.3M parameters with the embedded BPE tokenizer) on the same prompt/completion
pairs: Countdown noisy traces (the pretraining corpus generator) under the R1-Zero prompt, loss
on the completion tokens only, batch ``--batch-size`` sequences, AdamW lr 1e-3, fp32, one epoch.
TRL runs with its defaults for prompt-completion data (completion-only loss, padding to the
longest sequence in the batch, no packing); ours runs with its defaults (``--share-prefix``: the
token prefix every sequence of a step shares runs once, as a KV cache all rows attend to;
``--pack``: first-fit packing with a block-diagonal mask; logits only at completion positions).

Throughput is non-pad tokens (prompt + completion + EOS of every sequence trained on) per second
of training steps: TRL's from ``on_step_begin`` to ``on_step_end`` (its batch collation is not
counted), ours the sum of `aha sft`'s step times (collation included). The sides alternate
TRL/ours ``--repeats`` times, each in a fresh model; the speedup is the median of the ratios
of back-to-back pairs.

    pip install -e '.[bench]'
    python bench/sft_vs_trl.py              # 3 repeats of 1 epoch over 800 pairs
    python bench/sft_vs_trl.py --quick      # smoke

The last line is ``sft_speedup=X``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ahamoment.models import (
    build_tokenizer,
    new_model,
    r1_zero_prompt,
    save_model,
    tiny_llama_config,
)
from ahamoment.tasks import get_task
from ahamoment.tasks.base import TraceNoise


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    task = get_task("countdown")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = task.sample(rng)
        out.append(
            {"prompt": r1_zero_prompt(p.question), "completion": task.trace(p, rng, TraceNoise())}
        )
    return out


def run_ours(model_dir: Path, data: Path, args, work: Path) -> float:
    from rich.console import Console

    from ahamoment.stages.sft import SFTConfig, sft

    s = sft(
        SFTConfig(
            data=str(data),
            model=str(model_dir),
            epochs=1,
            batch_size=args.batch_size,
            lr=1e-3,
            warmup=5,
            heldout_n=0,
            save_every=0,
            out=str(work),
            threads=1,
            max_len=args.max_len,
        ),  # fmt: skip
        Console(quiet=True),
    )
    return s["train_tok_s"]


def run_trl(model_dir: Path, pairs: list[dict[str, str]], args, work: Path) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ahamoment.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    lengths = {}  # non-pad tokens per step, from the attention mask TRL collated

    class Timer(TrainerCallback):
        def __init__(self):
            self.spent, self.t0 = 0.0, 0.0

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.spent += time.perf_counter() - self.t0

    cfg = SFTConfig(
        output_dir=str(work), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=1e-3, warmup_steps=5, lr_scheduler_type="cosine", logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=True, max_length=args.max_len,
        dataloader_num_workers=0, seed=0, bf16=False, fp16=False, disable_tqdm=True,
    )  # fmt: skip
    timer = Timer()
    trainer = SFTTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok,
        callbacks=[timer],
    )  # fmt: skip
    # count the non-pad tokens TRL feeds: its tokenized dataset, every row once per epoch
    lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
    trainer.train()
    return sum(lengths) / timer.spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.repeats, args.hidden, args.layers = 64, 1, 64, 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pairs = make_pairs(args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer([p["prompt"] + p["completion"] for p in make_pairs(2000, 1)], 512)
        model = new_model(
            tiny_llama_config(tok, args.hidden, args.layers, 4, 3 * args.hidden, 1024), seed=0
        )
        model_dir = tmp / "model"
        save_model(model, tok, model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        data = tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(
            f"model: {n_params / 1e6:.2f}M parameters, {len(pairs)} pairs, batch {args.batch_size}"
        )
        ratios = []
        for r in range(args.repeats):
            trl = run_trl(model_dir, pairs, args, tmp / f"trl{r}")
            ours = run_ours(model_dir, data, args, tmp / f"ours{r}")
            ratios.append(ours / trl)
            print(
                f"repeat {r}: TRL {trl:,.0f} tok/s   aha sft {ours:,.0f} tok/s   ratio {ours / trl:.2f}"
            )
    print(f"sft_speedup={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
