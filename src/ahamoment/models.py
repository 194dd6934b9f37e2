"""Models and tokenizers: any Hugging Face causal-LM directory, plus the embedded default.

The embedded default is a tiny Llama-architecture model with a BPE tokenizer built here
with `tokenizers`. Digits and operators are kept as single characters (arithmetic needs
them); the constant prompt text merges into a few long tokens, so the R1-Zero template
costs little compute. Saved directories load with plain transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ahamoment.prompts import CHAT_TEMPLATE, THINK_TAGS, r1_zero_prompt

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def set_threads(n: int) -> int:
    """Set torch's CPU threads: ``n``, or every core this process may use when ``n`` is 0."""
    n = n if n > 0 else max(1, len(os.sched_getaffinity(0)))
    torch.set_num_threads(n)
    return n


def cache_dir() -> Path:
    """Where built models live: $AHAMOMENT_CACHE, else $XDG_CACHE_HOME/ahamoment, else ~/.cache."""
    env = os.environ.get("AHAMOMENT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ahamoment"


# --- tokenizer -----------------------------------------------------------------------------
# Digits, operators, brackets, commas and newlines are isolated before BPE, so numbers are
# always spelled digit by digit; everything else (words, the constant template) may merge.
_ISOLATE = r"[0-9]|[+\-*/=(),.\[\]:]|\n"


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, extra_tokens: Iterable[str | AddedToken] = ()
) -> PreTrainedTokenizerFast:
    """BPE over ``texts``; each of ``extra_tokens`` becomes one token of its own (added after
    training, so they take no merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_ISOLATE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *THINK_TAGS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    extra = list(extra_tokens)
    if extra:
        tok.add_tokens(
            [t if isinstance(t, AddedToken) else AddedToken(t, normalized=False) for t in extra]
        )
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer, guarded against silent class swaps.

    With transformers 5.24, AutoTokenizer on a ``qwen2`` directory replaces a custom
    ``tokenizer.json`` by Qwen2Tokenizer and the ids change. When a tokenizer.json is present
    we compare ids on a probe string with the raw `tokenizers` file and, on a mismatch, load
    the file itself.
    """
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    raw_file = path / "tokenizer.json"
    if raw_file.exists():
        raw = Tokenizer.from_file(str(raw_file))
        probe = r1_zero_prompt("Using the numbers [13, 7, 5], make 15.") + "<think>\n13+7=20"
        if tok.encode(probe, add_special_tokens=False) != raw.encode(probe).ids:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(raw_file))
            for name in ("pad_token", "bos_token", "eos_token"):
                value = _special_from_config(path, name)
                if value:
                    setattr(tok, name, value)
            tok.chat_template = _chat_template_from_config(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_config(path: Path) -> dict:
    cfg = path / "tokenizer_config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else {}


def _special_from_config(path: Path, name: str) -> str | None:
    value = _tokenizer_config(path).get(name)
    return value.get("content") if isinstance(value, dict) else value


def _chat_template_from_config(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    return _tokenizer_config(path).get("chat_template")


# --- model ---------------------------------------------------------------------------------
def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path
) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
