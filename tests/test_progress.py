"""The progress bar logs plain lines when output is not a terminal (a file, a CI log)."""

from io import StringIO

from rich.console import Console

from ahamoment.progress import progress_bar


def test_plain_lines_when_not_a_terminal():
    out = StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with progress_bar(console, every=0.0) as bar:
        task = bar.add_task("aha zero", total=3, info="")
        for i in range(3):
            bar.update(task, advance=1, info=f"reward {i / 10:.2f}")
    text = out.getvalue()
    for i in range(3):
        assert f"aha zero: {i + 1}/3" in text and f"reward {i / 10:.2f}" in text


def test_no_plain_lines_within_the_interval():
    out = StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with progress_bar(console, every=3600.0) as bar:
        task = bar.add_task("aha pretrain", total=5, info="")
        for _ in range(4):
            bar.update(task, advance=1, info="loss 1.0")
    assert "aha pretrain: 1/5" not in out.getvalue()  # only the live frame at exit


def test_terminal_output_is_the_live_bar_only():
    out = StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with progress_bar(console, every=0.0) as bar:
        task = bar.add_task("aha zero", total=2, info="")
        bar.update(task, advance=1, info="x")
    assert "aha zero: 1/2" not in out.getvalue()
