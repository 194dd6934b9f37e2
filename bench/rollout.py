"""Rollout speed: our KV-cache sampler against Hugging Face ``generate`` on the same weights.

Both sides sample the same batch from the same model: 16 countdown prompts x 8 completions
(the shape of one GRPO rollout, 128 sequences), 128 new tokens each, T=1, no top-p or top-k,
and EOS ignored, so every row yields exactly 128 tokens and the token counts are equal.
Our side is ``ahamoment.rollout.sampler.sample``; the other is ``model.generate`` with
``do_sample=True`` and its default dynamic KV cache. Two models are measured:

- ``llama3m``: a Llama of about 3.2M parameters (width 256, 4 layers), random weights built
  from a config with the embedded tokenizer and saved to a temporary directory;
- ``default``: the embedded default model (``aha pretrain``; built on first use, then cached).

Every run pins one torch thread (two threads on a loaded 2-core box stall by up to 50x) and
the sides alternate A/B/A/B after one warm-up call each. The table gives the median tokens/s
over the repeats; the speedup is the median of the per-repeat ratios (each ratio pairs two
runs made back to back). The last line is ``rollout_speedup=X`` for the embedded default.

    python bench/rollout.py                      # both models, 5 repeats
    python bench/rollout.py --quick              # smoke: 4 x 2 sequences, 16 tokens, 1 repeat
    python bench/rollout.py --models default --repeats 9
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from ahamoment.evaluation import encode_prompts
from ahamoment.models import load_model, load_tokenizer, n_params, new_model, tiny_llama_config
from ahamoment.rollout.sampler import SamplingParams, sample
from ahamoment.tasks import get_task

MODELS = ("llama3m", "default")  # the embedded default goes last: its ratio is the headline


@dataclass
class Sizes:
    prompts: int = 16
    group: int = 8
    new_tokens: int = 128
    repeats: int = 5


def model_dirs(names: list[str], tmp: Path, console: Console) -> dict[str, Path]:
    """Directories holding each named model's weights and tokenizer (both sides load them)."""
    from ahamoment.stages.pretrain import PretrainConfig, pretrain

    default = pretrain(PretrainConfig(task="countdown"), console)
    dirs = {}
    for name in names:
        if name == "default":
            dirs[name] = default
        elif name == "llama3m":
            tok = load_tokenizer(default)
            cfg = tiny_llama_config(
                tok, hidden=256, layers=4, heads=4, intermediate=672, max_positions=512
            )
            path = tmp / "llama3m"
            model = new_model(cfg, seed=0)
            model.save_pretrained(str(path))
            tok.save_pretrained(str(path))
            dirs[name] = path
        else:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return dirs


def countdown_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    """``n`` countdown prompts rendered with the R1-Zero template, as in `aha zero`."""
    task, rng = get_task("countdown"), random.Random(seed)
    return encode_prompts(tokenizer, [task.sample(rng) for _ in range(n)])


def time_call(fn: Callable[[], int]) -> tuple[float, int]:
    """Seconds and the token count returned by ``fn``."""
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, tokens


def run_model(name: str, path: Path, sz: Sizes, console: Console) -> dict:
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    pad = tokenizer.pad_token_id
    prompts = countdown_prompts(tokenizer, sz.prompts, seed=1)
    rows = [p for p in prompts for _ in range(sz.group)]  # (B,) prompt lists, groups adjacent
    B = len(rows)

    # ours: no stop ids, so EOS is ignored and each row runs to max_new_tokens
    params = SamplingParams(
        temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=sz.new_tokens, stop_ids=()
    )
    gen = torch.Generator().manual_seed(0)

    def ours() -> int:
        return sum(len(c.ids) for c in sample(model, rows, params, gen, pad))

    # HF: left-padded batch; eos_token_id=None on the generation config so EOS is ignored
    L = max(len(r) for r in rows)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, L - len(r) :] = torch.tensor(r)
        attn[i, L - len(r) :] = 1
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, pad, tokenizer.bos_token_id
    hf_settings = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=sz.new_tokens,
        use_cache=True,
    )

    @torch.no_grad()
    def hf() -> int:
        out = model.generate(input_ids=input_ids, attention_mask=attn, **hf_settings)
        new = out[:, L:]  # (B, new_tokens)
        return int(new.numel())

    torch.manual_seed(0)
    hf(), ours()  # warm-up (first calls allocate and build kernels)
    runs: dict[str, list[float]] = {"hf_generate": [], "ours": []}
    ratios = []
    for r in range(sz.repeats):
        t_hf, n_hf = time_call(hf)
        t_us, n_us = time_call(ours)
        assert n_hf == n_us == B * sz.new_tokens, (n_hf, n_us)
        runs["hf_generate"].append(n_hf / t_hf)
        runs["ours"].append(n_us / t_us)
        ratios.append(runs["ours"][-1] / runs["hf_generate"][-1])
        console.print(
            f"  {name} repeat {r + 1}/{sz.repeats}: HF {n_hf / t_hf:,.0f} tok/s ({t_hf:.2f} s), "
            f"ours {n_us / t_us:,.0f} tok/s ({t_us:.2f} s), ratio {ratios[-1]:.2f}"
        )
    return {
        "name": name,
        "params": n_params(model),
        "batch": B,
        "prompt_len": L,
        "hf": statistics.median(runs["hf_generate"]),
        "ours": statistics.median(runs["ours"]),
        "speedup": statistics.median(ratios),
        "hf_settings": hf_settings | {"eos_token_id": None, "cache": "dynamic"},
        "attn": model.config._attn_implementation,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of llama3m, default")
    ap.add_argument("--repeats", type=int, default=5, help="A/B pairs per model")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    args = ap.parse_args(argv)
    sz = Sizes(repeats=args.repeats)
    if args.quick:
        sz = Sizes(prompts=4, group=2, new_tokens=16, repeats=1)
    names = [m for m in MODELS if m in args.models.split(",")]  # default always last
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    console = Console(width=120)
    console.print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; batch "
        f"{sz.prompts} prompts x {sz.group} = {sz.prompts * sz.group} sequences x "
        f"{sz.new_tokens} new tokens, T=1.0, top-p 1.0, top-k 0, EOS ignored, fp32"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_dirs(names, Path(tmp), console).items():
            results.append(run_model(name, path, sz, console))

    table = Table(title=f"Rollout tokens/s (median of {sz.repeats}; 1 thread)")
    for col in ("model", "params", "sequences", "prompt len", "HF generate", "ours", "speedup"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        table.add_row(
            r["name"],
            f"{r['params'] / 1e6:.2f}M",
            str(r["batch"]),
            str(r["prompt_len"]),
            f"{r['hf']:,.0f}",
            f"{r['ours']:,.0f}",
            f"{r['speedup']:.2f}x",
        )
    console.print(table)
    console.print(f"HF generate settings: {results[0]['hf_settings']}, attn {results[0]['attn']}")
    for r in results:
        key = "rollout_speedup" if r["name"] == "default" else f"rollout_speedup_{r['name']}"
        print(f"{key}={r['speedup']:.2f}")


if __name__ == "__main__":
    main()
