"""Two "languages" for the reasoning of the embedded world: a measurable stand-in for the
Chinese/English mixing of DeepSeek-R1-Zero's chains of thought.

The target language is the trace grammar of the tasks (``7-5=2,2+13=15|15,yes``). The second
language writes the same steps with other symbols: ``7－5＝2，2＋13＝15｜15，是``. Numerals are
shared, as Arabic numerals are in Chinese text, and every symbol maps to exactly one symbol,
each a single token in a bilingual tokenizer: a step costs the same number of tokens in either
language, so a pressure on length alone cannot remove the mixing (a test checks this).

The foreign script is CJK: CJK punctuation, ideographs and the fullwidth forms (the second
language uses only these). The same rule flags Chinese in a real model's English reasoning.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken

# Target-language token -> second-language token, one to one.
TO_FOREIGN: dict[str, str] = {
    "+": "＋",
    "-": "－",
    "*": "＊",
    "/": "／",
    "=": "＝",
    ",": "，",
    "|": "｜",
    ":": "：",
    "yes": "是",
    "no": "否",
    "wait": "等",
    "check": "验",
}
FOREIGN_TOKENS: tuple[str, ...] = tuple(TO_FOREIGN.values())
"""The second language's symbols."""
TARGET_WORDS: tuple[str, ...] = ("yes", "no", "wait", "check")
"""Target-language words; BPE may split the rarer ones ("wait" -> w·a·it), so a bilingual
tokenizer adds them whole, like the foreign symbols: one token per symbol in both languages."""


def bilingual_tokens() -> list[AddedToken]:
    """The tokens a bilingual tokenizer adds: the target words (as whole words only) and the
    foreign symbols."""
    words = [AddedToken(w, single_word=True, normalized=False) for w in TARGET_WORDS]
    return words + [AddedToken(t, normalized=False) for t in FOREIGN_TOKENS]


# CJK symbols and punctuation, CJK ideographs (incl. extension A), halfwidth/fullwidth forms.
FOREIGN_SCRIPT = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")

_TOKEN = re.compile(r"yes|no|wait|check|[+\-*/=,|:]")
_THINK = re.compile(r"<think>(.*?)(?:</think>|<answer>|$)", re.DOTALL)
_BEFORE_ANSWER = re.compile(r"^(.*?)(?:</think>|<answer>|$)", re.DOTALL)


def to_foreign(line: str) -> str:
    """A target-language trace line in the second language (digits unchanged)."""
    return _TOKEN.sub(lambda m: TO_FOREIGN[m.group(0)], line)


def reasoning(completion: str) -> str:
    """The chain of thought: inside ``<think>``, else everything before the answer."""
    m = _THINK.search(completion)
    if m:
        return m.group(1)
    return _BEFORE_ANSWER.match(completion).group(1)  # always matches


def is_foreign(ch: str) -> bool:
    return FOREIGN_SCRIPT.match(ch) is not None
