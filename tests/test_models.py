import json
import subprocess
import sys

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from ahamoment.models import load_tokenizer, save_model
from ahamoment.prompts import r1_zero_prompt
from tests_support import corpus_text


def test_tokenizer_round_trip(tiny_tokenizer):
    texts = [
        corpus_text(),
        "<think>\n13+7=20,20-5=15,no\nwait,check:20-5=15,no\n</think>\n<answer>7-5+13</answer>",
        "unicode: naïve 数学 − ½ 🙂",  # bytes outside the corpus must still round-trip
        "",
    ]
    for text in texts:
        ids = tiny_tokenizer.encode(text, add_special_tokens=False)
        assert tiny_tokenizer.decode(ids) == text


def test_digits_and_tags_are_single_tokens(tiny_tokenizer):
    toks = tiny_tokenizer.convert_ids_to_tokens(
        tiny_tokenizer.encode("<think>123+45=168</think>", add_special_tokens=False)
    )
    assert toks == ["<think>", "1", "2", "3", "+", "4", "5", "=", "1", "6", "8", "</think>"]


def test_chat_template_renders_the_r1_zero_prompt(tiny_tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == r1_zero_prompt("What is 2+2?")


def test_saved_model_loads_with_plain_transformers(tiny_model, tiny_tokenizer, tmp_path):
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    text = r1_zero_prompt("Using the numbers [1, 2, 3], create an equation that equals 6.")
    expected = tiny_tokenizer.encode(text, add_special_tokens=False)
    # A fresh interpreter that never imports ahamoment.
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'm')!r})\n"
        f"ids = t.encode({text!r}, add_special_tokens=False)\n"
        "out = m(torch.tensor([ids])).logits\n"
        "assert 'ahamoment' not in sys.modules\n"
        "print(json.dumps({'ids': ids, 'cls': type(m).__name__, 'shape': list(out.shape)}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ids"] == expected
    assert got["cls"] == "LlamaForCausalLM"
    assert got["shape"] == [1, len(expected), len(tiny_tokenizer)]


def test_qwen2_model_type_does_not_swap_our_tokenizer(tiny_model, tiny_tokenizer, tmp_path):
    """transformers 5.24 swaps a custom tokenizer for Qwen2Tokenizer on model_type=qwen2."""
    d = tmp_path / "q"
    save_model(tiny_model, tiny_tokenizer, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    text = corpus_text()
    want = raw.encode(text).ids
    auto_ids = AutoTokenizer.from_pretrained(str(d)).encode(text, add_special_tokens=False)
    ours = load_tokenizer(d)
    assert ours.encode(text, add_special_tokens=False) == want
    assert ours.decode(want) == text
    assert ours.eos_token == tiny_tokenizer.eos_token and ours.pad_token == tiny_tokenizer.pad_token
    # Record whether the trap fired on this transformers version: either way ours is right.
    print("AutoTokenizer ids match raw:", auto_ids == want)
