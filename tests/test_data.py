"""JSONL reading with file:line errors, and held-out sets deduplicated by canonical form."""

import random
import re

import pytest

from ahamoment.data import DataError, heldout_set, read_jsonl, sample_excluding
from ahamoment.tasks import get_task
from ahamoment.tasks.countdown import Countdown


def test_read_jsonl_skips_blank_lines_and_counts_from_one(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize(
    "content, line, message",
    [
        (b'{"a": 1}\n{"a": \n', 2, "invalid JSON"),
        (b'{"a": 1}\n\n[1, 2]\n', 3, "expected a JSON object, got list"),
        (b'"text"\n', 1, "expected a JSON object, got str"),
        (b"null\n", 1, "expected a JSON object, got NoneType"),
        (b'{"a": 1}\n{"a": "\xff"}\n', 2, "not UTF-8"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: {message}"):
        list(read_jsonl(path))
    assert issubclass(DataError, ValueError)


def test_heldout_set_is_distinct_excludes_and_is_seeded():
    task = get_task("countdown")
    train = {task.canonical(p) for p in heldout_set(task, 300, seed=0)}
    held = heldout_set(task, 500, seed=1, exclude=train)
    keys = [task.canonical(p) for p in held]
    assert len(keys) == len(set(keys)) == 500
    assert not set(keys) & train
    assert [p.id for p in heldout_set(task, 500, seed=1, exclude=train)] == [p.id for p in held]


def test_heldout_set_dedupes_reorderings():
    # 3 numbers from 1..2 with +-: multisets {111,112,122,222} reach 6 targets in all:
    # 111->1,3; 112->2,4 (1+1-2=0 is dropped); 122->1,3,5; 222->2,6.
    task = Countdown("tiny", (3,), 1, 2, "+-")
    assert task.count_space() == 9
    assert len(heldout_set(task, 9, seed=0)) == 9
    with pytest.raises(ValueError, match="only 9 of 10"):
        heldout_set(task, 10, seed=0)


def test_sample_excluding():
    task = Countdown("tiny", (3,), 1, 2, "+-")
    everything = {task.canonical(p) for p in heldout_set(task, 9, seed=0)}
    keep = "1,1,1->3"
    rng = random.Random(0)
    for _ in range(20):
        assert task.canonical(sample_excluding(task, rng, everything - {keep})) == keep
    with pytest.raises(ValueError, match="no problem outside"):
        sample_excluding(task, rng, everything, max_tries=100)
