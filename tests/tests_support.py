"""Helpers importable from test modules (tests/ is on sys.path under pytest's rootdir)."""

from ahamoment.models import r1_zero_prompt


def corpus_text() -> str:
    return (
        r1_zero_prompt(
            "Using the numbers [13, 7, 5], create an equation that equals 15. "
            "You can use + and - and each number must be used exactly once."
        )
        + "<think>\n13+7=20,20-5=15,yes\n</think>\n<answer>13+7-5</answer>"
    )
