"""Rollout speed: our KV-cache sampler against Hugging Face ``generate`` on the same weights.

Every side samples the same batch from the same model: 16 countdown prompts x 8 completions
(the shape of one GRPO rollout, 128 sequences), 128 new tokens each, T=1, no top-p or top-k,
and EOS ignored, so every row yields exactly 128 tokens and the token counts are equal.
Four sides, alternated within every round:

- ``hf``: ``model.generate(do_sample=True)`` with its default dynamic KV cache, as users run it;
- ``hf_compiled``: HF's fastest CPU setting, as its "LLM inference optimization" guide says:
  ``generation_config.cache_implementation = "static"`` and ``model.forward =
  torch.compile(model.forward, fullgraph=True)`` (default mode: the guide's
  ``mode="reduce-overhead"`` is CUDA graphs, which do nothing on CPU). On CPU, transformers
  5.24 does not compile by itself (``_valid_auto_compile_criteria`` wants a GPU);
- ``ours_eager``: ``rollout.sampler.sample``, the eager step (the engine's current default);
- ``ours``: the same with ``compile=True``, the fused step (``rollout/compiled.py``), as the
  torch engine runs it by default;
- ``ours_fp16``: the fused step with keys and values cached as half floats, each rounded once
  (``kv_cache="float16"``, ``aha zero --kv-cache float16``; not the default), with ratio lines
  of its own (``rollout_speedup_fp16_cache``).

Two models are measured:

- ``llama3m``: a Llama of about 3.2M parameters (width 256, 4 layers), random weights built
  from a config with the embedded tokenizer and saved to a temporary directory;
- ``default``: the embedded default model, the shipped base ``aha zero`` starts from (built by
  ``aha pretrain`` on first use only where none is shipped).

**Compile time counts.** Nothing is warmed up: round 0 is every side's first call in this
process, timed like the others. ``hf_compiled`` compiles into a fresh, empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` set to a temporary directory), so its round 0 holds a cold
compile. Our kernels are built once per machine into the ahamoment cache; the bench builds
them in a fresh process with an empty cache and adds that time to our round 0, so both sides
are priced as on a fresh machine. The headline ratios (``rollout_speedup``,
``rollout_speedup_vs_hf_compiled``) are total time over all rounds, round 0 included, of the
other side over ours; the ``_steady`` ones are the median over rounds 1.. of the ratio of two
calls made back to back (compile excluded). Both depend on the number of rounds: a GRPO run
makes hundreds of rollouts per process, so its compile shares are far smaller than here.

**FLOP fraction.** ``rollout_flop_frac`` is our decode's achieved GFLOP/s (median of rounds
1..) over the GFLOP/s of a 2048 x 2048 fp32 matmul timed in the same run on the same thread
(the faster of torch's own product and oneDNN's, which our decoding step uses).
FLOPs are counted for one forward per generated token: a row with a p-token prompt predicts
its token i (0-based) from a forward that attends to c = p + i keys, costing
``2 * P + 4 * L * H * D * c`` (P: the weights of every nn.Linear, lm_head included, each a
multiply-add per token; the attention: q.k and p.v, one multiply-add each per head dimension,
per key, per head, per layer). Norms, RoPE, softmax and sampling are not counted, nor the
prompt's prefill beyond its last token, so the figure is a lower bound on the work done.

Every run pins one torch thread unless ``--threads`` says otherwise (two threads on a loaded
2-core box stall by up to 50x; on an idle one they show what ``aha zero`` gets from both
cores: its runs use every core, and our attention splits its rows over them). The last line
is ``rollout_speedup=X`` for the embedded default.

    python bench/rollout.py                      # both models, 5 repeats (~15 min)
    python bench/rollout.py --quick              # smoke: 4 x 2 sequences, 16 tokens, 1 repeat
    python bench/rollout.py --models default --repeats 9
    python bench/rollout.py --models default --threads 2   # both cores, on an idle machine
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from ahamoment import onednn
from ahamoment.evaluation import encode_prompts
from ahamoment.models import load_model, load_tokenizer, n_params, new_model, tiny_llama_config
from ahamoment.rollout import compiled
from ahamoment.rollout.sampler import SamplingParams, sample
from ahamoment.tasks import get_task

MODELS = ("llama3m", "default")  # the embedded default goes last: its ratio is the headline
SIDES = ("hf", "hf_compiled", "ours_eager", "ours", "ours_fp16")


@dataclass
class Sizes:
    prompts: int = 16
    group: int = 8
    new_tokens: int = 128
    repeats: int = 5


def model_dirs(names: list[str], tmp: Path, console: Console) -> dict[str, Path]:
    """Directories holding each named model's weights and tokenizer (all sides load them)."""
    from ahamoment.base_models import embedded_base
    from ahamoment.stages.pretrain import PretrainConfig

    # the base aha zero starts from: shipped with the package (built only where none is)
    default = embedded_base(PretrainConfig(task="countdown"), console)
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


def matmul_gflops(n: int = 2048, tries: int = 3) -> float:
    """GFLOP/s of an n x n fp32 matmul on torch's threads (the best of ``tries``), the faster
    of torch's own product (MKL) and oneDNN's (what our decoding step uses, ``onednn``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def rate(fn: Callable[[], object]) -> float:
        fn()
        best = min(time_call(lambda: (fn(), 0)[1])[0] for _ in range(tries))
        return 2 * n**3 / best / 1e9

    return max(rate(lambda: a @ b), rate(lambda: onednn.linear(a, b)))


def rollout_flops(model: torch.nn.Module, prompt_lens: list[int], new_tokens: int) -> float:
    """FLOPs of one forward per generated token (see the module docstring)."""
    cfg = model.config
    P = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim  # per key attended
    N = new_tokens
    # token i of a row attends to p + i keys: sum over i of (p + i) = N p + N (N - 1) / 2
    keys = sum(N * p + N * (N - 1) / 2 for p in prompt_lens)
    return 2 * P * N * len(prompt_lens) + attn * keys


def cold_kernel_build(head_dim: int, kv_half: bool = False) -> float:
    """Seconds to build our fused kernels in a fresh process with an empty cache (the build
    only: importing torch is every side's cost)."""
    code = (
        "import time; from ahamoment.rollout import compiled; t = time.perf_counter(); "
        f"compiled.kernels({int(head_dim)}, kv_half={bool(kv_half)}); "
        "print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, AHAMOMENT_CACHE=tmp)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    return float(out.stdout.strip().splitlines()[-1])


def run_model(name: str, path: Path, sz: Sizes, sides: tuple[str, ...], console: Console) -> dict:
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    head_dim = model.model.layers[0].self_attn.head_dim
    build_s = cold_kernel_build(head_dim)
    build_fp16_s = cold_kernel_build(head_dim, kv_half=True)
    pad = tokenizer.pad_token_id
    prompts = countdown_prompts(tokenizer, sz.prompts, seed=1)
    rows = [p for p in prompts for _ in range(sz.group)]  # (B,) prompt lists, groups adjacent
    B = len(rows)

    # ours: no stop ids, so EOS is ignored and each row runs to max_new_tokens
    params = SamplingParams(
        temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=sz.new_tokens, stop_ids=()
    )
    gen = torch.Generator().manual_seed(0)

    def ours(compile: bool, kv_cache: str = "model") -> Callable[[], int]:
        def run() -> int:
            outs = sample(model, rows, params, gen, pad, compile=compile, kv_cache=kv_cache)
            return sum(len(c.ids) for c in outs)

        return run

    # HF: left-padded batch; eos_token_id=None on the generation config so EOS is ignored
    L = max(len(r) for r in rows)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, L - len(r) :] = torch.tensor(r)
        attn[i, L - len(r) :] = 1
    hf_settings = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=sz.new_tokens,
        use_cache=True,
    )

    def hf_side(m: torch.nn.Module) -> Callable[[], int]:
        gc = m.generation_config
        gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, pad, tokenizer.bos_token_id

        @torch.no_grad()
        def run() -> int:
            out = m.generate(input_ids=input_ids, attention_mask=attn, **hf_settings)
            return int(out[:, L:].numel())  # (B, new_tokens)

        return run

    fns = {"hf": hf_side(model), "ours_eager": ours(False), "ours": ours(True)}
    fns["ours_fp16"] = ours(True, "float16")
    if "hf_compiled" in sides:
        static = load_model(path).eval()  # its own copy: the eager side keeps the plain forward
        static.generation_config.cache_implementation = "static"
        static.forward = torch.compile(static.forward, fullgraph=True)
        fns["hf_compiled"] = hf_side(static)
    compiled.kernels(head_dim)  # load (or build) them here; a fresh machine's is ``build_s``
    compiled.kernels(head_dim, kv_half=True)  # and ``build_fp16_s``

    torch.manual_seed(0)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(sz.repeats + 1):  # round 0: every side's first call, compile included
        line = []
        for side in sides:
            t, n = time_call(fns[side])
            assert n == B * sz.new_tokens, (side, n)
            times[side].append(t)
            line.append(f"{side} {t:.2f} s")
        console.print(f"  {name} round {r}/{sz.repeats}: " + ", ".join(line))
    console.print(
        f"  {name}: fused kernels built in {build_s:.2f} s, their half-cache build in "
        f"{build_fp16_s:.2f} s (fresh process, empty cache)"
    )
    times["ours"][0] += build_s  # the kernel build of a fresh machine
    times["ours_fp16"][0] += build_fp16_s

    def total(side: str) -> float:
        return sum(times[side])

    def steady(side: str, ours: str = "ours") -> float:  # median of rounds 1..'s ratios
        return statistics.median(a / b for a, b in zip(times[side][1:], times[ours][1:]))

    tokens = B * sz.new_tokens
    flops = rollout_flops(model, [len(r) for r in rows], sz.new_tokens)
    t_ours = statistics.median(times["ours"][1:])
    return {
        "name": name,
        "params": n_params(model),
        "batch": B,
        "prompt_len": L,
        "tok_s": {s: tokens / statistics.median(times[s][1:]) for s in sides},
        "first_s": {s: times[s][0] for s in sides},
        "speedup": {s: total(s) / total("ours") for s in sides},
        "fp16": (total("hf") / total("ours_fp16"), steady("hf", "ours_fp16")),
        "steady": {s: steady(s) for s in sides},
        "gflops": flops / t_ours / 1e9,
        "hf_settings": hf_settings | {"eos_token_id": None, "cache": "dynamic"},
        "attn": model.config._attn_implementation,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of llama3m, default")
    ap.add_argument("--repeats", type=int, default=5, help="rounds after the first call")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    ap.add_argument(
        "--skip-hf-compiled", action="store_true", help="leave out hf_compiled (it compiles ~1 min)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads for every side and the matmul"
    )
    args = ap.parse_args(argv)
    sz = Sizes(repeats=args.repeats)
    if args.quick:
        sz = Sizes(prompts=4, group=2, new_tokens=16, repeats=1)
    names = [m for m in MODELS if m in args.models.split(",")]  # default always last
    sides = tuple(s for s in SIDES if not (args.skip_hf_compiled and s == "hf_compiled"))
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    console = Console(width=120)
    console.print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; batch "
        f"{sz.prompts} prompts x {sz.group} = {sz.prompts * sz.group} sequences x "
        f"{sz.new_tokens} new tokens, T=1.0, top-p 1.0, top-k 0, EOS ignored, fp32"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # cold compiles
        peak = matmul_gflops()
        console.print(f"2048^2 fp32 matmul: {peak:.1f} GFLOP/s")
        for name, path in model_dirs(names, Path(tmp), console).items():
            results.append(run_model(name, path, sz, sides, console))

    table = Table(
        title=f"Rollout tokens/s (median of rounds 1-{sz.repeats}; {args.threads} thread(s)) "
        "and first calls"
    )
    for col in ("model", "side", "tok/s", "first call", "ours vs side", "steady", "GFLOP/s"):
        table.add_column(col, justify="left" if col in ("model", "side") else "right")
    for r in results:
        for s in sides:
            flop_s = r["gflops"] * r["tok_s"][s] / r["tok_s"]["ours"]
            table.add_row(
                f"{r['name']} ({r['params'] / 1e6:.2f}M)" if s == sides[0] else "",
                s,
                f"{r['tok_s'][s]:,.0f}",
                f"{r['first_s'][s]:.2f} s",
                f"{r['speedup'][s]:.2f}x",
                f"{r['steady'][s]:.2f}x",
                f"{flop_s:.1f}",
            )
    console.print(table)
    console.print(
        "ours vs side: the side's total time over ours, all rounds (round 0: first calls, "
        "compile and our kernel build included); steady: median ratio over rounds 1..; "
        f"GFLOP/s: counted FLOPs over the median time, against {peak:.1f} for the matmul"
    )
    console.print(f"HF generate settings: {results[0]['hf_settings']}, attn {results[0]['attn']}")
    for r in results:
        sfx = "" if r["name"] == "default" else f"_{r['name']}"
        lines = {
            "rollout_speedup_eager_engine": r["speedup"]["hf"] / r["speedup"]["ours_eager"],
            "rollout_speedup_steady": r["steady"]["hf"],
            "rollout_flop_frac": r["gflops"] / peak,
        }
        if "hf_compiled" in sides:
            lines["rollout_speedup_vs_hf_compiled_steady"] = r["steady"]["hf_compiled"]
            lines["rollout_speedup_vs_hf_compiled"] = r["speedup"]["hf_compiled"]
        lines["rollout_speedup_fp16_cache_steady"] = r["fp16"][1]
        lines["rollout_speedup_fp16_cache"] = r["fp16"][0]
        lines["rollout_speedup"] = r["speedup"]["hf"]
        for key, value in lines.items():
            print(f"{key}{sfx}={value:.{3 if 'frac' in key else 2}f}")


if __name__ == "__main__":
    main()
