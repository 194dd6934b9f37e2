"""Verified reasoning traces: the rejection-sampling filters and a crash-safe JSONL store.

Filters run in a fixed order and a rejected sample is counted under the first one it fails:
``no_reasoning``, ``format``, ``incorrect`` (the task's verifier), ``too_long``,
``language`` (share of characters outside the expected script), ``duplicate`` (exact, after
whitespace normalisation) and ``near_duplicate`` (difflib similarity ratio of the whitespace-normalised reasoning plus
answer, without the constant tags, to a sample already kept for the same prompt).

The store writes each prompt's kept rows to the current shard, flushed and fsynced, and only
then a done-marker line to ``done.jsonl``. On resume, a torn last line is cut off, and rows of
prompts without a marker (a kill between the two writes) are dropped and generated again; so
after any kill -9 every prompt's samples are present exactly once. A line that is damaged
anywhere else is an error naming the file and the line (``DataError``), never a traceback.
"""

from __future__ import annotations

import difflib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ahamoment import atomic
from ahamoment.data import DataError, read_jsonl
from ahamoment.rewards import format_reward, judge
from ahamoment.rollout import Completion
from ahamoment.tasks.base import Problem
from ahamoment.teachers import final_answer

REJECT_REASONS = (
    "no_reasoning",
    "format",
    "incorrect",
    "too_long",
    "language",
    "duplicate",
    "near_duplicate",
)


@dataclass
class TraceFilters:
    max_chars: int = 4000
    """Longest completion kept, in characters (0: no limit)."""
    min_script_share: float = 0.95
    """Least share of reasoning characters in the expected script (ASCII here; 0: off)."""
    near_dup: float = 0.9
    """Similarity ratio (difflib) to a kept sample at or above which a sample is a near duplicate (1: off)."""


def completion_text(reasoning: str, answer: str) -> str:
    """The R1 format a student is trained to write."""
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"


def script_share(text: str) -> float:
    """Share of non-space characters that are ASCII (the expected script of our tasks)."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isascii() for c in chars) / len(chars) if chars else 1.0


def similarity(a: str, b: str) -> float:
    """difflib's ratio 2M/T (M matched characters, T both lengths); quick bounds first."""
    m = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return m.ratio() if m.real_quick_ratio() >= 0.5 and m.quick_ratio() >= 0.5 else 0.0


def filter_samples(
    problem: Problem, samples: list[Completion], filters: TraceFilters
) -> tuple[list[tuple[str, str, str]], Counter]:
    """Kept (reasoning, answer, completion) triples and the rejection counts by reason."""
    kept: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    bodies: list[str] = []
    rejected: Counter = Counter()
    for s in samples:
        if not s.reasoning:
            rejected["no_reasoning"] += 1
            continue
        answer = final_answer(s.text or "")
        completion = completion_text(s.reasoning, answer)
        if not answer or format_reward(problem, completion) < 1.0:
            rejected["format"] += 1
            continue
        if not judge(problem, completion)[1].correct:
            rejected["incorrect"] += 1
            continue
        if filters.max_chars and len(completion) > filters.max_chars:
            rejected["too_long"] += 1
            continue
        if script_share(s.reasoning) < filters.min_script_share:
            rejected["language"] += 1
            continue
        key = " ".join(completion.split())
        if key in seen:
            rejected["duplicate"] += 1
            continue
        body = " ".join(f"{s.reasoning} {answer}".split())  # the tags would inflate similarity
        if filters.near_dup < 1.0 and any(similarity(body, b) >= filters.near_dup for b in bodies):
            rejected["near_duplicate"] += 1
            continue
        seen.add(key)
        bodies.append(body)
        kept.append((s.reasoning, answer, completion))
    return kept, rejected


def _marker(path: Path, lineno: int, row: dict[str, Any]) -> dict[str, Any]:
    """A done marker, checked: ``prompt_id`` (str), ``accepted`` (int), ``rejected`` (dict)."""
    if not isinstance(row.get("prompt_id"), str):
        raise DataError(f"{path}:{lineno}: field 'prompt_id': expected a string")
    if type(row.get("accepted")) is not int or not isinstance(row.get("rejected"), dict):
        raise DataError(
            f"{path}:{lineno}: fields 'accepted' and 'rejected': expected an int and an object"
        )
    return row


def _prompt_id(path: Path, lineno: int, row: dict[str, Any]) -> str:
    meta = row.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt_id"), str):
        raise DataError(f"{path}:{lineno}: field 'meta.prompt_id': expected a string")
    return meta["prompt_id"]


class TraceStore:
    """``out/traces-NNNNN.jsonl`` shards plus ``out/done.jsonl`` markers, resumable."""

    def __init__(self, out: Path, shard_rows: int = 10_000) -> None:
        self.out = out
        self.shard_rows = shard_rows
        out.mkdir(parents=True, exist_ok=True)
        self.done_path = out / "done.jsonl"
        atomic.cut_torn_tail(self.done_path)
        self.done: dict[str, dict[str, Any]] = {}
        if self.done_path.exists():
            for lineno, row in read_jsonl(self.done_path):
                row = _marker(self.done_path, lineno, row)
                self.done[row["prompt_id"]] = row
        self.shards = sorted(out.glob("traces-*.jsonl"))
        for shard in self.shards:  # drop rows of prompts that never got their marker
            atomic.cut_torn_tail(shard)
            rows = list(read_jsonl(shard))
            keep = [row for n, row in rows if _prompt_id(shard, n, row) in self.done]
            if len(keep) != len(rows):
                atomic.write_text(shard, "".join(json.dumps(r) + "\n" for r in keep))
        if not self.shards:
            self.shards = [out / "traces-00000.jsonl"]
        self.rows_in_shard = (
            len(self.shards[-1].read_text().splitlines()) if self.shards[-1].exists() else 0
        )

    def write(self, prompt_id: str, rows: list[dict[str, Any]], marker: dict[str, Any]) -> None:
        """Append one prompt's rows (one write, flushed and fsynced), then its marker."""
        if rows and self.rows_in_shard >= self.shard_rows:
            self.shards.append(self.out / f"traces-{len(self.shards):05d}.jsonl")
            self.rows_in_shard = 0
        if rows:
            data = "".join(json.dumps(r) + "\n" for r in rows)
            with self.shards[-1].open("a") as f:
                atomic.fault_point("traces.rows", f, data)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.rows_in_shard += len(rows)
        marker = {"prompt_id": prompt_id, **marker}
        with self.done_path.open("a") as f:
            atomic.fault_point("traces.marker", f, json.dumps(marker) + "\n")
            f.write(json.dumps(marker) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[prompt_id] = marker


def read_traces(out: str | Path) -> list[dict[str, Any]]:
    """Every kept row of a trace directory, shard by shard."""
    rows = []
    for shard in sorted(Path(out).glob("traces-*.jsonl")):
        rows += [row for _, row in read_jsonl(shard)]
    return rows
