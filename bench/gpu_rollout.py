"""Rollout speed on a CUDA GPU: our sampler against HF ``generate``, bf16, on a model shaped
like Qwen2-0.5B (24 layers, width 896, 14 query heads over 2 key/value heads, MLP 4,864,
vocabulary 151,936), built from its config with random weights: no download.

Both sides decode the same batch (``--prompts`` x ``--group`` rows of ``--prompt-len`` random
tokens, ``--new-tokens`` each, T=1, EOS ignored, so the token counts are equal), alternating
HF/ours after one warm-up call each. HF runs as users run it (eager, dynamic cache) and, with
``--hf-static``, with ``cache_implementation="static"`` and ``torch.compile``. Ours runs as the
default engine runs it (``compile=True``: on CUDA the step replayed from CUDA graphs,
``rollout/graphs.py``; their captures land in the warm-up round) and eager (``ours_eager``).
The last lines are ``cuda_graphs_speedup=X`` (ours against ours_eager) and
``gpu_rollout_speedup=X`` (ours against HF as users run it).

    python bench/gpu_rollout.py                 # on a machine with a CUDA GPU
    python bench/gpu_rollout.py --quick         # smoke test (also runs on CPU, float32)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ahamoment.rollout import SamplingParams, sample

QWEN2_05B = dict(
    vocab_size=151_936,
    hidden_size=896,
    intermediate_size=4_864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4_096,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-static", action="store_true", help="add HF static cache + compile")
    ap.add_argument("--quick", action="store_true", help="tiny model and batch (smoke test)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = dict(QWEN2_05B)
    if args.quick:
        shape.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip
        args.prompts, args.group, args.prompt_len, args.new_tokens, args.repeats = 2, 2, 8, 8, 1
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(10, shape["vocab_size"], (args.prompt_len,), generator=g).tolist()
        for _ in range(args.prompts)
    ]
    rows = [p for p in prompts for _ in range(args.group)]
    B, L, N = len(rows), args.prompt_len, args.new_tokens
    params = SamplingParams(temperature=1.0, max_new_tokens=N)
    ids = torch.tensor(rows, device=device)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id = None, 0

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def ours(compile: bool = True) -> int:
        gen = torch.Generator(device=device).manual_seed(0)
        out = sample(model, rows, params, gen, 0, compile=compile)
        return sum(len(c.ids) for c in out)

    @torch.no_grad()
    def hf(m) -> int:
        out = m.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
        )  # fmt: skip
        return int(out[:, L:].numel())

    sides = {"hf": lambda: hf(model), "ours_eager": lambda: ours(False), "ours": ours}
    if args.hf_static:
        static = Qwen2ForCausalLM(Qwen2Config(**shape)).to(device=device, dtype=dtype).eval()
        static.load_state_dict(model.state_dict())
        static.generation_config.eos_token_id, static.generation_config.pad_token_id = None, 0
        static.generation_config.cache_implementation = "static"
        static.forward = torch.compile(static.forward, fullgraph=True)
        sides["hf_static"] = lambda: hf(static)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(args.repeats + 1):  # round 0: warm-up (and compilation), not counted
        for name, fn in sides.items():
            sync()
            t = time.perf_counter()
            n = fn()
            sync()
            assert n == B * N, (name, n)
            times[name].append(time.perf_counter() - t)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    tok_s = {k: B * N / statistics.median(v[1:]) for k, v in times.items()}
    print(f"device {device} {torch.cuda.get_device_name() if cuda else ''} dtype {dtype}")
    print(f"batch {B} x {N} new tokens, prompt {L}; tokens/s: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in tok_s.items()))  # fmt: skip
    if "hf_static" in tok_s:
        print(f"gpu_rollout_speedup_vs_hf_static={tok_s['ours'] / tok_s['hf_static']:.2f}")
    # off CUDA (--quick), compile=True is the fused CPU step, not graphs
    label = "cuda_graphs_speedup" if cuda else "cpu_compiled_speedup"
    print(f"{label}={tok_s['ours'] / tok_s['ours_eager']:.2f}")
    print(f"gpu_rollout_speedup={tok_s['ours'] / tok_s['hf']:.2f}")


if __name__ == "__main__":
    main()
