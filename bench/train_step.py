"""The trainer's packed log-prob forward and backward with LoRA, two ways side by side.

``--compare lora`` (the default): one merged product per projection (``lora_linear.py``)
against peft's own LoRA layers. ``--compare gather``: every attention bucket's rows gathered
by one ``index_select`` per tensor and layer (``logprobs._RowBuckets.GATHER_ONCE``) against one
gather per bucket. ``--compare onednn``: the products through oneDNN (``onednn.py``) against
torch's own fp32 dispatch (MKL). ``--compare grads``: the adapters' gradients by the one-pass
kernel (``lora_linear.FUSED_GRADS``) against four matrix products. ``--compare attention``: the
stream's attention by two C kernels over the whole stream (``stream_attention.py``) against SDPA
over buckets of rows. ``--compare fused``: RMS norms and SiLU gates by C kernels
(``fused_ops.py``) against the HF modules. ``--compare compile``: what a user would compile
instead, the model's own padded forward (prompt + completion per row, right-padded to a
multiple of 64 tokens so that lengths share a few shapes; log-softmax and gather of the
completion tokens; peft's LoRA layers) under ``torch.compile`` (inductor's CPU backend,
static shapes, an empty cache), against our packed path; the compile time, in the first call,
is printed apart and left out of the timings, as the warm-up call is. ``--compare layers``:
our packed path with each layer's norms, projections and MLP under ``torch.compile``
(``logprobs.compile_layers``, ``--compile-train``) against the same path as it runs by default;
``--compare layers_plain``: the same two with none of our C kernels on either side, as on a
GPU. The compile lands in the first calls, printed apart. ``--compare micro``: the batch in
forward/backward calls of 32 rows against calls of 64 (``aha zero``'s ``micro_batch`` inside
its minibatches of 64), gradients accumulating.

Both sides run ``completion_logprobs`` on the shipped embedded base with rank-4 adapters on
every projection (``aha zero``'s targets; its recipe's rank is 8; B moved off 0 so every
adapter path computes), over
one batch shaped like a late GRPO step: 16 prompts of 38-45 tokens x 8 completions whose
lengths are drawn around 85 tokens (5-192), then backpropagate a sum of the log-probs. The
sides alternate ``--repeats`` times on the same batches; each timing is the median of
``--steps`` back-to-back calls after one warm-up call. The speedup is the median of the ratios
of back-to-back pairs.

    python bench/train_step.py                              # ~1 min
    python bench/train_step.py --compare gather --threads 2 # as aha zero runs on 2 cores
    python bench/train_step.py --quick                      # smoke

The last line is ``train_step_speedup=X`` (``gather_speedup=X``, ``onednn_speedup=X``,
``grads_speedup=X``, ``attention_speedup=X``, ``fused_speedup=X``, ``compile_speedup=X``,
``layers_speedup=X``, ``layers_plain_speedup=X``, ``micro_speedup=X`` for the other
comparisons).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from ahamoment import fused_ops, logprobs, lora, lora_linear, onednn, stream_attention
from ahamoment.base_models import shipped_model
from ahamoment.logprobs import completion_logprobs
from ahamoment.stages.pretrain import PretrainConfig

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DNN_DEFAULT = onednn.ENABLED  # oneDNN's products by default here (off on Intel CPUs)


def batch(seed: int, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """16 prompts x 8 completions of random tokens, lengths as in a late GRPO step."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(16):
        p = [rng.randrange(3, vocab) for _ in range(rng.randrange(38, 46))]
        for _ in range(8):
            n = max(5, min(192, int(rng.gauss(85, 35))))
            prompts.append(p)
            completions.append([rng.randrange(3, vocab) for _ in range(n)])
    return prompts, completions


def time_side(
    model,
    batches,
    merged: bool,
    once: bool = True,
    dnn: bool | None = None,
    fused: bool = True,
    attn: bool = True,
    ops: bool = True,
    layers: bool = False,
    micro: int = 0,
) -> float:
    lora_linear.ENABLED, lora_linear.FUSED_GRADS = merged, fused
    stream_attention.ENABLED, fused_ops.ENABLED = attn, ops
    lm = lora.sampling_model(model)
    if layers:  # logprobs.compile_layers, kept from the first call on
        if lm not in COMPILED:
            logprobs.compile_layers(model)
            COMPILED[lm] = logprobs._COMPILED[lm]
        logprobs._COMPILED[lm] = COMPILED[lm]
    else:
        logprobs._COMPILED.pop(lm, None)
    logprobs._RowBuckets.GATHER_ONCE = once
    onednn.ENABLED = DNN_DEFAULT if dnn is None else dnn  # None: this CPU's default
    times = []
    for i, (p, c) in enumerate(batches):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        step = micro or len(p)  # rows per forward/backward, gradients accumulating
        for j in range(0, len(p), step):
            logp, mask, _ = completion_logprobs(
                model, p[j : j + step], c[j : j + step], 1.0, 0, with_entropy=True
            )
            (logp * mask).sum().backward()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


COMPILED: dict = {}  # --compare layers: the compiled layer parts of each model, made once

PAD_TO = 64  # the compiled side's length buckets


def padded_logprob_sum(model, ids, attn, scored):
    """Sum of the log-probs of the scored tokens: ids, attn, scored (B, L), right-padded."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # (B, L-1, V)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * scored[:, 1:]).sum()


def padded(prompts, completions):
    """Rows of prompt + completion, right-padded to a multiple of PAD_TO: ids, attention mask,
    and the completion tokens' mask, (B, L) each."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    L = -(-max(map(len, rows)) // PAD_TO) * PAD_TO
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    scored = torch.zeros(len(rows), L)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        scored[i, len(p) : len(r)] = 1
    return ids, attn, scored


def time_compiled(model, batches, step) -> tuple[float, float]:
    """The compiled side: (median seconds per call, seconds of the first calls, compile
    included). Ours off (peft's layers, the HF modules), as a user's own code would run."""
    switches = lora_linear.ENABLED, stream_attention.ENABLED, fused_ops.ENABLED
    lora_linear.ENABLED = stream_attention.ENABLED = fused_ops.ENABLED = False
    times, first = [], 0.0
    try:
        for i, (p, c) in enumerate(batches):
            args = padded(p, c)
            t = time.perf_counter()
            model.zero_grad(set_to_none=True)
            step(model, *args).backward()
            if i:
                times.append(time.perf_counter() - t)
            else:
                first = time.perf_counter() - t
    finally:
        lora_linear.ENABLED, stream_attention.ENABLED, fused_ops.ENABLED = switches
    return statistics.median(times), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="Alternations of the two sides.")
    ap.add_argument("--steps", type=int, default=4, help="Timed calls per side and repeat.")
    ap.add_argument("--quick", action="store_true", help="Smoke test: 1 repeat of 1 call.")
    ap.add_argument(
        "--compare",
        choices=(
            "lora",
            "gather",
            "onednn",
            "grads",
            "attention",
            "fused",
            "compile",
            "layers",
            "layers_plain",
            "micro",
        ),
        default="lora",
        help="What to compare.",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads.")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = shipped_model(PretrainConfig().cache_key())
    if base is None:
        raise SystemExit("the shipped default base is missing: reinstall ahamoment")
    model = lora.load_policy(base, None, 4, 32.0, TARGETS).train()
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.normal_(std=0.02)
    vocab = model.config.vocab_size
    batches = [batch(s, vocab) for s in range(args.steps + 1)]
    tokens = sum(len(c) for c in batches[0][1])
    ratios, rows = [], []
    # per comparison: the switches of the side before, then of ours (time_side's keywords)
    sides = {
        # the buckets' gathers: attention by the buckets on both sides
        "gather": (dict(once=False, attn=False), dict(once=True, attn=False)),
        "attention": (dict(attn=False), dict(attn=True)),
        "fused": (dict(ops=False), dict(ops=True)),
        "onednn": (dict(dnn=False), dict(dnn=True)),
        "grads": (dict(fused=False), dict(fused=True)),
        "lora": (dict(merged=False), dict()),
        "layers": (dict(), dict(layers=True)),
        # aha zero's micro-batches: a minibatch of 64 rows in two calls, or in one
        "micro": (dict(micro=32), dict(micro=64)),
        # what a GPU runs: none of our C kernels, on both sides
        "layers_plain": (
            dict(attn=False, ops=False, fused=False),
            dict(attn=False, ops=False, fused=False, layers=True),
        ),
    }
    before_kw, ours_kw = sides.get(args.compare, ({}, {}))
    dnn_on = onednn.ENABLED
    step = None
    if args.compare in ("compile", "layers", "layers_plain"):  # cold compiles: a fresh cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    if args.compare == "compile":
        step = torch.compile(padded_logprob_sum, dynamic=False)
    if args.compare.startswith("layers"):  # the first call compiles: timed apart
        t = time.perf_counter()
        time_side(model, batches[:2], **{"merged": True, **ours_kw})
        print(
            f"compiled layers: first two calls {time.perf_counter() - t:.1f} s (compile included)"
        )
    for r in range(args.repeats):
        if step is not None:
            before_s, first = time_compiled(model, batches, step)
            if r == 0:
                print(f"compiled side: first call {first:.1f} s (inductor's compile included)")
        else:
            before_s = time_side(model, batches, **{"merged": True, **before_kw})
        ours_s = time_side(model, batches, **{"merged": True, **ours_kw})
        ratios.append(before_s / ours_s)
        rows.append((r, before_s, ours_s))
    lora_linear.ENABLED, logprobs._RowBuckets.GATHER_ONCE, onednn.ENABLED = True, True, dnn_on
    logprobs._COMPILED.clear()
    lora_linear.FUSED_GRADS = stream_attention.ENABLED = fused_ops.ENABLED = True
    print(f"batch: 128 rows, {tokens} completion tokens in the first; {args.threads} thread(s)")
    heads = {
        "gather": ("gather per bucket (s)", "gather once (s)"),
        "onednn": ("torch's MKL (s)", "oneDNN (s)"),
        "grads": ("four products (s)", "one-pass kernel (s)"),
        "attention": ("SDPA buckets (s)", "stream kernels (s)"),
        "fused": ("HF modules (s)", "C kernels (s)"),
        "compile": ("torch.compile, padded (s)", "ours, packed (s)"),
        "layers": ("ours (s)", "ours, layers compiled (s)"),
        "layers_plain": ("no C kernels (s)", "no C kernels, layers compiled (s)"),
        "micro": ("micro-batches of 32 (s)", "of 64 (s)"),
    }.get(args.compare, ("peft LoRA (s)", "merged product (s)"))
    print(f"repeat  {heads[0]}  {heads[1]}  ratio")
    for r, a, b in rows:
        print(f"{r:>6}  {a:>{len(heads[0])}.3f}  {b:>{len(heads[1])}.3f}  {a / b:.2f}")
    name = f"{args.compare}_speedup" if args.compare != "lora" else "train_step_speedup"
    print(f"{name}={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
