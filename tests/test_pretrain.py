"""Corpus and cache key of the embedded base model."""

import random
import re

from ahamoment.data import sample_excluding
from ahamoment.splits import excluded, heldout, real_countdown
from ahamoment.stages import pretrain as P
from ahamoment.stages.pretrain import PretrainConfig, make_corpus
from ahamoment.tasks import get_task


def _problem_key(doc: str) -> str:
    nums = sorted(int(x) for x in re.search(r"numbers \[(.*?)\]", doc).group(1).split(","))
    target = int(re.search(r"equals (\d+)", doc).group(1))
    return ",".join(map(str, nums)) + f"->{target}"


def test_corpus_is_decontaminated_against_heldout_and_real_problems():
    cfg = PretrainConfig(corpus_docs=3000, seed=3)
    docs, stats = make_corpus(cfg)
    task = get_task("countdown")
    banned = {task.canonical(p) for p in heldout("countdown", 1000)}
    banned |= {task.canonical(p) for p in real_countdown()}
    keys = {_problem_key(d) for d in docs}
    assert not keys & banned
    assert banned <= excluded("countdown")
    # some real rows do fall in the default space, so the exclusion is not vacuous
    in_space = [
        p
        for p in real_countdown()
        if len(p.fields["nums"]) == 3
        and max(p.fields["nums"]) <= 25
        and p.fields["target"] in task.reachable(tuple(sorted(p.fields["nums"])))
    ]
    assert in_space
    assert 0.2 < stats["corpus_accuracy"] < 0.8


def test_template_share_of_documents():
    docs, _ = make_corpus(PretrainConfig(corpus_docs=2000, p_template=0.25, seed=1))
    share = sum(d.startswith("A conversation") for d in docs) / len(docs)
    # binomial(2000, .25): sd ~ .0097, so +-.04 is a 4-sigma band
    assert abs(share - 0.25) < 0.04


def test_sample_excluding_never_returns_a_banned_problem():
    task = get_task("countdown")
    rng = random.Random(0)
    banned = excluded("countdown")
    assert all(
        task.canonical(sample_excluding(task, rng, banned)) not in banned for _ in range(500)
    )


def test_cache_key_tracks_corpus_and_version(monkeypatch):
    key = PretrainConfig().cache_key()
    assert key == PretrainConfig(threads=2, save_every=7, out="x").cache_key()
    assert key != PretrainConfig(p_give_up=0.5).cache_key()
    monkeypatch.setattr(P, "CORPUS_VERSION", P.CORPUS_VERSION + 1)
    assert key != PretrainConfig().cache_key()
