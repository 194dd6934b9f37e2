"""`aha report`: curves, the aha-moment test and a self-contained HTML page from a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ahamoment import cli
from ahamoment.data import read_jsonl
from ahamoment.logging_backends import make_logger, scalars
from ahamoment.registry import UnknownName
from ahamoment.stages.report import detect_aha, fisher_greater, highlight

FIXTURE = Path(__file__).parent / "fixtures" / "zero_run"
CONFIG = {"reward": "accuracy=1.0,format=0.1"}
FIXES = "<think>\n3+4=7|8,wait,check: no\n4+4=8|8,yes\n</think>\n<answer>4+4</answer>"
PLAIN = "<think>\n4+4=8|8,yes\n</think>\n<answer>4+4</answer>"


def _is_png(path: Path) -> bool:
    import matplotlib.image

    data = path.read_bytes()
    img = matplotlib.image.imread(path)  # decodes the whole image
    return data[:8] == b"\x89PNG\r\n\x1a\n" and img.ndim == 3 and min(img.shape[:2]) > 100


def test_report_from_fixture_run(tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli.main(["report", str(FIXTURE), "--out", str(out)]) == 0
    assert _is_png(out / "curves.png") and _is_png(out / "aha.png")
    page = (out / "report.html").read_text()
    for section in ("id='config'", "id='final'", "id='curves'", "id='aha'", "id='samples'"):
        assert section in page
    assert page.count("data:image/png;base64,") == 2  # both images inlined
    assert "http://" not in page and "https://" not in page  # nothing fetched from a network
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # escaped
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in page  # the problem text is escaped too
    assert "<h4>start: step 1</h4>" in page and "<h4>end: step 30</h4>" in page
    # the fixture logs no clip_frac and no throughput: those panels are skipped with a note
    assert "panel “Clip fraction” skipped" in page and "panel “Throughput” skipped" in page
    assert "panel “Language mixing” skipped" in page  # the fixture predates the metric
    # final table: pass1 0.25 -> 0.45 from summary.json
    assert "<td>pass1</td><td>0.25</td><td>0.45</td><td>0.2</td>" in page
    # the fixture self-corrects in every 3rd step's correct sample at a flat rate (1/3):
    # baseline steps 1..10 hold 3/10, no window beats it, so there is no aha moment
    assert "No aha moment detected" in page and "Fisher exact test" in page
    assert "report.html" in capsys.readouterr().out


def test_partial_runs_overlay_without_crashing(tmp_path):
    """A live run (torn last line, no samples, no summary) overlays with a finished one."""
    live = tmp_path / "live"
    live.mkdir()
    rows = [{"step": s, "reward": 0.1 * s, "accuracy": 0.05 * s} for s in range(1, 4)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew'
    (live / "metrics.jsonl").write_text(text)
    assert len(list(read_jsonl(live / "metrics.jsonl", tolerant=True))) == 3
    out = tmp_path / "rep"
    assert cli.main(["report", str(FIXTURE), str(live), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<h3>zero_run</h3>" in page and "<h3>live</h3>" in page
    assert "no summary.json: partial run" in page and "No samples.jsonl" in page
    assert _is_png(out / "curves.png")


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().out
    assert cli.main(["report"]) == 2  # no run given


def test_fisher_exact_by_hand():
    # x0=0/2 vs x1=2/2: K=2 successes among N=4, P(both in group 1) = C(2,2)C(2,0)/C(4,2) = 1/6
    assert fisher_greater(0, 2, 2, 2) == pytest.approx(1 / 6, abs=1e-12)
    # 1/3 vs 3/3: K=4, N=6, draws 3: P(X>=3) = C(4,3)C(2,0)/C(6,3) = 4/20
    assert fisher_greater(1, 3, 3, 3) == pytest.approx(0.2, abs=1e-12)
    assert fisher_greater(3, 3, 0, 3) == 1.0  # X >= 0 always


def _samples(rate_of_step, steps: int = 60, per_step: int = 4) -> list[dict]:
    """per_step correct samples per step; the first round(rate * per_step) self-correct."""
    rows = []
    for s in range(1, steps + 1):
        k = round(rate_of_step(s) * per_step)
        for i in range(per_step):
            rows.append({"step": s, "completion": FIXES if i < k else PLAIN, "reward": 1.1})
        rows.append({"step": s, "completion": FIXES, "reward": 0.1})  # wrong: never counted
    return rows


def test_planted_base_rate_is_not_an_aha_moment():
    """The corpus plants self-correction at step 0; a flat 25% rate must not count."""
    aha = detect_aha(_samples(lambda s: 0.25), CONFIG, baseline_steps=10, window=10)
    assert aha.base == (10, 40)  # steps 1..10: 1 of 4 correct samples each
    assert not aha.found and aha.n_tests == 41  # window ends 20..60
    assert aha.vs_zero_step == 20  # a test against a zero rate would have fired at once


def test_rise_in_self_correction_is_detected():
    aha = detect_aha(_samples(lambda s: 0.25 if s <= 30 else 1.0), CONFIG, 10, 10)
    assert aha.found and 31 <= aha.step <= 40
    x1, n1 = aha.hit
    assert x1 / n1 > 0.25 and aha.p_value < aha.threshold == pytest.approx(0.01 / 41)


def test_highlight_escapes_and_marks():
    out = highlight("<think>a<b & Wait, check</think>\n<answer>1<2</answer><img src=x>")
    assert out.startswith('<span class="think">&lt;think&gt;a&lt;b &amp; <mark>Wait</mark>')
    assert '<span class="answer">&lt;answer&gt;1&lt;2&lt;/answer&gt;</span>' in out
    assert "<img" not in out and "&lt;img src=x&gt;" in out


def test_loggers(tmp_path):
    assert scalars({"step": 3, "kl": 0.5, "ok": True, "eval/settings": {}, "x": None}) == {
        "kl": 0.5
    }
    log = make_logger("jsonl", tmp_path)
    log.log(1, {"kl": 0.1})
    log.close()
    with pytest.raises(UnknownName):
        make_logger("nope", tmp_path)
    pytest.importorskip("tensorboard")
    log = make_logger("tensorboard", tmp_path, {"lr": 1e-3})
    log.log(1, {"step": 1, "reward": 0.5, "eval/settings": {"n": 4}})
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_language_mixing_panel_only_when_some_run_mixes(tmp_path):
    from ahamoment.runs import load_run
    from ahamoment.stages.report import plot_curves

    def run(rate: float):
        d = tmp_path / f"r{rate}"
        d.mkdir(exist_ok=True)
        rows = [{"step": s, "reward": 0.1, "mixing_rate": rate} for s in range(1, 4)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_run(d)

    _, notes = plot_curves([run(0.0)], smooth=1)
    assert any("Language mixing" in n and "0 throughout" in n for n in notes)
    _, notes = plot_curves([run(0.0), run(0.4)], smooth=1)
    assert not any("Language mixing" in n for n in notes)


def test_dynamics_need_final_and_every_late_eval():
    from ahamoment.runs import Run
    from ahamoment.stages.report import dynamics

    def ev(step, p1, ln, sc):
        return {
            "step": step,
            "eval/pass1": p1,
            "eval/mean_len": ln,
            "eval/self_correction_rate": sc,
        }

    run = Run(
        Path("."),
        "r",
        {"steps": 100},
        # step 60 is outside the last 20%: its low values do not count
        [
            ev(60, 0.01, 10.0, 0.0),
            {"step": 70},
            ev(80, 0.22, 50.0, 0.01),
            ev(100, 0.25, 60.0, 0.02),
        ],
        [],
        {
            "heldout": {"pass1": 0.1, "mean_len": 40.0, "self_correction_rate": 0.0},
            # the periodic problems' own step 0: the tail is measured against it
            "periodic": {"pass1": 0.11, "mean_len": 40.0, "self_correction_rate": 0.0},
        },
        {"trained": {"pass1": 0.25, "mean_len": 60.0, "self_correction_rate": 0.03}},
    )
    got = {d.key: d for d in dynamics(run)}
    p1, ln, sc = got["pass1"], got["mean_len"], got["self_correction_rate"]
    assert p1.final_ratio == pytest.approx(2.5) and p1.tail_ratio == pytest.approx(2.0)
    assert p1.tail_evals == 2 and p1.met
    run.base_eval["periodic"]["pass1"] = 0.12  # 0.22 / 0.12 < 2: not sustained
    assert not {d.key: d for d in dynamics(run)}["pass1"].met
    del run.base_eval["periodic"]  # older runs: the tail falls back to the final's step 0
    assert {d.key: d for d in dynamics(run)}["pass1"].tail_ratio == pytest.approx(2.2)
    # final 1.5x, but the step-80 evaluation is 50/40 = 1.25x < 1.3x: a spike, not sustained
    assert ln.final_ratio == pytest.approx(1.5) and ln.tail_ratio == pytest.approx(1.25)
    assert not ln.met
    assert sc.final_ratio == float("inf") and sc.met  # from 0 to a positive rate
    run.summary = None
    assert not any(d.met for d in dynamics(run))  # no final figures yet
    run.base_eval = None
    assert dynamics(run) == []
