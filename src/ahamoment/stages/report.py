"""`aha report RUN_DIR [RUN_DIR ...]`: curves and a self-contained HTML page for `aha zero` runs.

For each run directory it reads ``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``,
``base_eval.json`` and ``summary.json`` (each optional: a partial run gives a partial report),
and writes to ``--out``:

- ``curves.png``: one panel per metric group (reward by component, train and held-out accuracy,
  length, reflection, entropy, KL, clip fraction, tokens/s); several runs overlay, one colour
  each. Per-step curves are smoothed with an exponential moving average, the raw curve faint
  beneath. A panel whose keys no run logged is left out, with a note.
- ``aha.png``: self-correction rate among correct sampled completions, per rolling window,
  against the base rate, with the detected "aha moment" marked.
- ``report.html``: config, final table, curves, aha moment, samples from the start, middle and
  end with ``<think>``, the answer and reflection words highlighted. No network: images are
  inlined as base64 data URIs, styles are inline, and every logged text is HTML-escaped.

The aha moment (:func:`detect_aha`): the base rate is the share of self-corrections
(:func:`ahamoment.metrics.is_self_correction`) among the correct completions sampled in the
first ``baseline_steps`` steps, since the pretraining corpus already plants "wait,check:" lines:
comparing against zero would flag the base model itself. Each rolling window of ``window``
steps after the baseline is compared against it with a one-sided Fisher exact test
(hypergeometric tail; exact for the small counts that ``samples.jsonl`` holds, and it accounts
for the uncertainty of the base rate too); the level ``alpha`` is Bonferroni-divided by the
number of windows tested. The aha moment is the last step of the first significant window.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import yaml
from rich.console import Console

from ahamoment.metrics import REFLECTION_WORDS, is_self_correction
from ahamoment.runs import Run, load_run


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)
    """Run directories of `aha zero` (also positional: `aha report RUN_DIR [RUN_DIR ...]`; as a flag, comma-separated). Several overlay their curves."""
    out: str = ""
    """Output directory for report.html and the PNGs; empty: RUN_DIR/report for one run, runs/report-<timestamp> for several."""
    smooth: int = 10
    """EMA span in steps for per-step curves (raw curve drawn faintly beneath); 1 disables smoothing."""
    baseline_steps: int = 0
    """Aha test: the samples of steps 1..N give the base self-correction rate; 0: max(10, 10% of the steps logged)."""
    window: int = 20
    """Aha test: rolling window of steps whose samples are compared against the base rate."""
    alpha: float = 0.01
    """Aha test: family-wise significance level, Bonferroni-divided by the number of windows tested."""

    positional: ClassVar[str] = "runs"  # cli.py adds `runs` as positional arguments too

    def __post_init__(self) -> None:
        if isinstance(self.runs, str):
            self.runs = [r for r in self.runs.split(",") if r.strip()]
        if not self.runs:
            raise ValueError("give at least one run directory: aha report RUN_DIR [RUN_DIR ...]")
        if self.smooth < 1 or self.window < 1 or self.baseline_steps < 0:
            raise ValueError("smooth and window must be >= 1, baseline_steps >= 0")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def run_labels(paths: list[Path]) -> list[str]:
    """Shortest distinct path suffixes: variants/grpo and variants_lr5e-4/grpo, not grpo twice."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(x) for x in parts) + 1):
        labels = ["/".join(x[-n:]) for x in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


# --- the aha-moment test -----------------------------------------------------------------
def fisher_greater(x0: int, n0: int, x1: int, n1: int) -> float:
    """One-sided Fisher exact p-value for "rate 1 > rate 0": P(X >= x1), X hypergeometric.

    Given K = x0 + x1 successes among N = n0 + n1 trials, X counts the successes that fall in
    the n1 trials of group 1 under the null of equal rates.
    """
    big_n, k = n0 + n1, x0 + x1
    total = math.comb(big_n, n1)
    tail = sum(math.comb(k, i) * math.comb(big_n - k, n1 - i) for i in range(x1, min(k, n1) + 1))
    return tail / total


def _reward_weights(spec: str) -> dict[str, float]:
    out = {}
    for part in str(spec).split(","):
        if part.strip():
            name, _, w = part.partition("=")
            out[name.strip()] = float(w) if w.strip() else 1.0
    return out


def correctness(config: dict[str, Any]) -> tuple[Any, str]:
    """A function sample-row -> bool|None, and how it decides (stated on the page).

    A row's own ``correct`` field wins; otherwise the total reward is thresholded halfway
    between the best an incorrect completion can earn (the other positive weights) and that
    plus the accuracy weight.
    """
    weights = _reward_weights(config.get("reward", "accuracy=1.0,format=0.1"))
    acc = weights.get("accuracy")
    if acc is None or acc <= 0:
        return (lambda row: row.get("correct")), "the samples' `correct` field"
    threshold = sum(w for n, w in weights.items() if n != "accuracy" and w > 0) + acc / 2

    def fn(row: dict[str, Any]) -> bool | None:
        if "correct" in row:
            return bool(row["correct"])
        r = row.get("reward")
        return None if r is None else r >= threshold

    return fn, f"reward ≥ {threshold:g} (reward weights {weights})"


@dataclass
class AhaResult:
    found: bool
    step: int | None
    """Last step of the first significant window."""
    window: tuple[int, int] | None
    """(first, last) step of that window."""
    base: tuple[int, int]
    """(self-corrections, correct completions) in the baseline steps."""
    hit: tuple[int, int] | None
    """The same counts in the significant window."""
    p_value: float | None
    threshold: float
    n_tests: int
    baseline_steps: int
    best: tuple[int, int, int, float] | None
    """(window end, x, n, p) of the smallest p-value, reported when nothing is found."""
    vs_zero_step: int | None
    """First window end with any self-correction: what a test against a zero rate would flag."""
    curve: list[tuple[int, float]]
    """(window end, rate) for the plot."""
    how_correct: str
    note: str = ""


def detect_aha(
    samples: list[dict[str, Any]],
    config: dict[str, Any],
    baseline_steps: int = 0,
    window: int = 20,
    alpha: float = 0.01,
) -> AhaResult:
    """First window whose self-correction rate among correct samples beats the base rate."""
    is_correct, how = correctness(config)
    by_step: dict[int, tuple[int, int]] = {}  # step -> (self-corrections, correct)
    for row in samples:
        if is_correct(row) and isinstance(row.get("completion"), str):
            x, n = by_step.get(int(row.get("step", 0)), (0, 0))
            by_step[int(row["step"])] = (x + is_self_correction(row["completion"]), n + 1)
    last = max((int(r.get("step", 0)) for r in samples), default=0)
    n_base = baseline_steps or max(10, round(0.1 * last))

    def counts(lo: int, hi: int) -> tuple[int, int]:  # steps lo..hi inclusive
        xs = [by_step.get(s, (0, 0)) for s in range(lo, hi + 1)]
        return sum(x for x, _ in xs), sum(n for _, n in xs)

    x0, n0 = counts(0, n_base)
    ends = list(range(n_base + window, last + 1))
    threshold = alpha / max(len(ends), 1)
    res = AhaResult(
        False, None, None, (x0, n0), None, None, threshold, len(ends), n_base, None, None, [], how
    )
    if not ends:
        res.note = (
            f"too few steps: {last} logged, {n_base} baseline + a {window}-step window needed"
        )
        return res
    if n0 == 0:
        res.note = f"no correct completion in the samples of steps 1..{n_base}: no base rate"
        return res
    best = vs_zero = found = None
    curve = []
    for e in ends:
        x1, n1 = counts(e - window + 1, e)
        if n1 == 0:
            continue
        curve.append((e, x1 / n1))
        if vs_zero is None and x1 > 0:
            vs_zero = e
        p = fisher_greater(x0, n0, x1, n1)
        if best is None or p < best[3]:
            best = (e, x1, n1, p)
        if found is None and p < threshold:
            found = (e, x1, n1, p)
    res.best, res.vs_zero_step, res.curve = best, vs_zero, curve
    if found is not None:
        e, x1, n1, p = found
        res.found, res.step, res.window = True, e, (e - window + 1, e)
        res.hit, res.p_value = (x1, n1), p
    return res


# --- plots -------------------------------------------------------------------------------
@dataclass
class Panel:
    title: str
    keys: list[str]
    ylabel: str = ""
    prefix_keys: str = ""
    """Also plot every logged key starting with this (e.g. reward components)."""
    skip_if_zero: bool = False
    """Skip the panel when every logged value is 0 (e.g. no run mixes languages)."""


PANELS: list[Panel] = [
    Panel("Reward by component", ["reward"], "reward", prefix_keys="reward/"),
    Panel("Accuracy: train and held-out", ["accuracy", "eval/pass1"], "accuracy"),
    Panel("Completion length", ["len_mean", "len_p90"], "tokens"),
    Panel("Reflection", ["reflection_rate", "self_correction_rate"], "rate"),
    # is the search real: tries per completion, checks among correct completions, and the
    # share of check-rejected attempts the verifier rejects too (tasks that name their tries)
    Panel("Attempts per completion", ["tries_mean", "eval/tries_mean"], "tries"),
    Panel("Checks", ["reflection_correct_rate", "check_precision"], "rate"),
    Panel("Curriculum level mix", [], "share of groups", prefix_keys="curriculum/"),
    Panel("Language mixing", ["mixing_rate"], "rate", skip_if_zero=True),
    Panel("Entropy", ["entropy"], "nats / token"),
    Panel("KL to reference", ["kl"], "kl"),
    Panel("Clip fraction", ["clip_frac"], "fraction"),
    Panel("Throughput", ["rollout_tok_s", "train_tok_s"], "tokens / s"),
]


def ema(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average, alpha = 2 / (span + 1)."""
    a = 2.0 / (span + 1)
    out, m, w = [], 0.0, 0.0
    for v in values:
        m = (1 - a) * m + a * v
        w = (1 - a) * w + a
        out.append(m / w)
    return out


def series(run: Run, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in run.metrics:
        v = row.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(row.get("step", len(xs) + 1)))
            ys.append(float(v))
    if key == "eval/pass1" and xs:  # held-out pass@1 of the base model and the final model too
        base = ((run.base_eval or {}).get("heldout") or {}).get("pass1")
        final = ((run.summary or {}).get("trained") or {}).get("pass1")
        if base is not None:
            xs, ys = [0, *xs], [base, *ys]
        if final is not None:
            xs, ys = [*xs, int(run.metrics[-1].get("step", xs[-1]))], [*ys, final]
    return xs, ys


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def plot_curves(runs: list[Run], smooth: int, dpi: int = 80) -> tuple[bytes | None, list[str]]:
    """The curve grid as PNG bytes (None if no panel has data) and notes on skipped panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    notes, todo = [], []
    for panel in PANELS:
        keys = list(panel.keys)
        if panel.prefix_keys:
            keys += sorted(
                {
                    k
                    for r in runs
                    for row in r.metrics
                    for k in row
                    if k.startswith(panel.prefix_keys)
                }
            )
        present = [k for k in keys if any(series(r, k)[0] for r in runs)]
        if not present:
            notes.append(f"panel “{panel.title}” skipped: no run logged {', '.join(keys)}")
            continue
        if panel.skip_if_zero and not any(any(series(r, k)[1]) for k in present for r in runs):
            notes.append(f"panel “{panel.title}” skipped: {', '.join(present)} is 0 throughout")
            continue
        todo.append((panel, present))
    if not todo:
        return None, notes
    cols = 4 if len(todo) > 4 else len(todo)
    rows = math.ceil(len(todo) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), dpi=dpi, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (panel, keys) in zip(axes.flat, todo):
        for ri, run in enumerate(runs):
            color = colors[ri % len(colors)]
            for ki, key in enumerate(keys):
                xs, ys = series(run, key)
                if not xs:
                    continue
                style = styles[ki % len(styles)]
                label = key if len(keys) > 1 and ri == 0 else None  # runs: one figure legend
                if len(xs) < 0.5 * len(run.metrics) or len(xs) < 8:  # sparse (periodic eval)
                    ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=label, lw=1.2)
                    continue
                ax.plot(xs, ys, style, color=color, alpha=0.2, lw=0.8)
                ax.plot(xs, ema(ys, smooth), style, color=color, label=label, lw=1.4)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(keys) > 1:  # line styles name the keys (drawn in black when runs overlay)
            handles = [
                Line2D(
                    [], [], ls=styles[i % len(styles)], color="k" if len(runs) > 1 else colors[0]
                )
                for i in range(len(keys))
            ]
            ax.legend(handles, keys, fontsize=6, loc="best")
    for ax in list(axes.flat)[len(todo) :]:
        ax.set_visible(False)
    title = f"smoothed: EMA span {smooth} steps (raw faint)" if smooth > 1 else "raw"
    if len(runs) > 1:
        handles = [Line2D([], [], color=colors[i % len(colors)], lw=2) for i in range(len(runs))]
        fig.legend(handles, [r.label for r in runs], loc="upper right", ncol=len(runs), fontsize=8)
        fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    else:
        fig.suptitle(f"{runs[0].label} — {title}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    data = _png(fig)
    plt.close(fig)
    return data, notes


def plot_aha(runs: list[Run], ahas: list[AhaResult], window: int, dpi: int = 80) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(a.curve for a in ahas):
        return None
    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=dpi)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, aha) in enumerate(zip(runs, ahas)):
        if not aha.curve:
            continue
        c = colors[i % len(colors)]
        xs, ys = zip(*aha.curve)
        ax.plot(xs, ys, color=c, lw=1.3, label=f"{run.label}: rolling {window}-step window")
        x0, n0 = aha.base
        ax.axhline(x0 / n0, color=c, ls="--", lw=1, label=f"{run.label}: base rate {x0}/{n0}")
        if aha.found:
            ax.axvline(aha.step, color=c, ls=":", lw=1.5)
            ax.annotate("aha", (aha.step, max(ys)), fontsize=8, color=c)
    ax.set_title("Self-correction among correct sampled completions", fontsize=9)
    ax.set_xlabel("step (window end)", fontsize=8)
    ax.set_ylabel("rate", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


# --- HTML --------------------------------------------------------------------------------
_MARK_RE = re.compile(r"(\b(?:" + "|".join(REFLECTION_WORDS) + r")\w*)", re.IGNORECASE)
_PART_RE = re.compile(r"(<think>.*?(?:</think>|$)|<answer>.*?(?:</answer>|$))", re.DOTALL)


def _marked(text: str) -> str:
    """Escape text, wrapping reflection words in <mark>."""
    parts = _MARK_RE.split(text)  # odd indices are the captured words
    return "".join(
        f"<mark>{html.escape(p)}</mark>" if i % 2 else html.escape(p) for i, p in enumerate(parts)
    )


def highlight(completion: str) -> str:
    """A completion as HTML: <think> and <answer> parts in their own spans, everything escaped."""
    out = []
    for i, part in enumerate(_PART_RE.split(completion)):
        if i % 2 == 0:
            out.append(_marked(part))
        else:
            cls = "think" if part.startswith("<think>") else "answer"
            out.append(f'<span class="{cls}">{_marked(part)}</span>')
    return "".join(out)


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}x"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


_SUMMARY_KEYS = [
    "pass1",
    "passk",
    "consk",
    "greedy_acc",
    "format_rate",
    "parse_fail_rate",
    "mean_len",
    "p90_len",
    "reflection_rate",
    "self_correction_rate",
    "step_accuracy",
]


def summary_html(run: Run) -> str:
    s = run.summary
    if not s:
        base = (run.base_eval or {}).get("heldout")
        if not base:
            return "<p>No summary.json and no base_eval.json: the run has not finished its first evaluation.</p>"
        rows = [[k, base[k]] for k in _SUMMARY_KEYS if k in base]
        return "<p>No summary.json (run incomplete): base model only.</p>" + _table(
            ["held-out metric", "base"], rows
        )
    b, t = s.get("base", {}), s.get("trained", {})
    rows = [
        [k, b[k], t[k], t[k] - b[k]]
        for k in _SUMMARY_KEYS
        if isinstance(b.get(k), int | float) and isinstance(t.get(k), int | float)
    ]
    out = f"<p>Held-out problems: {html.escape(_fmt(s.get('heldout_n', '?')))}; sampling {html.escape(json.dumps(b.get('settings', {})))}.</p>"
    out += _table(["metric", "base", "trained", "Δ"], rows)
    extra = [
        [k, s[k]]
        for k in ("template_baseline", "template_baseline_name", "corpus_accuracy", "wall_s")
        if k in s
    ]
    if extra:
        out += _table(["reference", "value"], extra)
    real = s.get("real_countdown") or {}
    if real.get("base") and real.get("trained"):
        rows = [
            [name, real["base"][name].get("pass1"), real["trained"][name].get("pass1")]
            for name in real["base"]
            if name in real["trained"]
        ]
        out += "<p>Real Countdown sample (TinyZero), pass@1:</p>" + _table(
            ["subset", "base", "trained"], rows
        )
    return out


DYNAMICS = (("pass1", 2.0), ("mean_len", 1.3), ("self_correction_rate", 1.3))
"""R1-Zero's dynamics as held-out ratios to the base model (step 0): accuracy that doubles,
responses 1.3x longer, self-correction 1.3x more frequent (the aha-moment recipe's bar)."""


@dataclass
class Dynamic:
    key: str
    need: float
    start: float
    """Base model on the final evaluation's problems (base_eval.json ``heldout``)."""
    final: float | None
    tail_start: float
    """Base model on the periodic evaluations' problems (``periodic``; else ``start``)."""
    tail_min: float | None
    """Lowest value over the periodic evaluations in the last ``tail`` of training."""
    tail_evals: int

    @staticmethod
    def ratio(value: float | None, start: float) -> float | None:
        if value is None:
            return None
        return value / start if start > 0 else (math.inf if value > 0 else 1.0)

    @property
    def final_ratio(self) -> float | None:
        return self.ratio(self.final, self.start)

    @property
    def tail_ratio(self) -> float | None:
        return self.ratio(self.tail_min, self.tail_start)

    @property
    def met(self) -> bool:
        r, t = self.final_ratio, self.tail_ratio
        return r is not None and r >= self.need and t is not None and t >= self.need


def dynamics(run: Run, tail: float = 0.2) -> list[Dynamic]:
    """Each of DYNAMICS against the base model: the final value (summary.json) against the base
    on the same problems, and the lowest periodic evaluation in the last ``tail`` of the steps
    against the base on the periodic problems, so one spike does not pass. Empty when the run
    has no base evaluation yet."""
    base = (run.base_eval or {}).get("heldout")
    if not base:
        return []
    periodic = (run.base_eval or {}).get("periodic") or base
    evals = [r for r in run.metrics if "eval/pass1" in r]
    steps = int(run.config.get("steps") or max((int(r["step"]) for r in run.metrics), default=0))
    late = [r for r in evals if int(r["step"]) >= (1 - tail) * steps]
    final = (run.summary or {}).get("trained") or {}
    out = []
    for key, need in DYNAMICS:
        vals = [float(r[f"eval/{key}"]) for r in late if f"eval/{key}" in r]
        out.append(
            Dynamic(
                key,
                need,
                float(base.get(key, 0.0)),
                float(final[key]) if key in final else None,
                float(periodic.get(key, 0.0)),
                min(vals) if vals else None,
                len(vals),
            )
        )
    return out


def dynamics_html(run: Run) -> str:
    rows = dynamics(run)
    if not rows:
        return "<p>No base evaluation yet.</p>"
    table = _table(
        [
            "held-out metric",
            "step 0",
            "final",
            "final / step 0",
            "step 0, periodic problems",
            "min over last 20%",
            "min / step 0",
            "needed",
            "met",
        ],
        [
            [
                d.key,
                d.start,
                d.final,
                d.final_ratio,
                d.tail_start,
                d.tail_min,
                d.tail_ratio,
                f"{d.need}x",
                "yes" if d.met else "no",
            ]
            for d in rows
        ],
    )
    return table + f"<p class='meta'>Last 20%: {rows[0].tail_evals} periodic evaluations.</p>"


def aha_html(run: Run, aha: AhaResult, anchor: str, cfg: ReportConfig) -> str:
    x0, n0 = aha.base
    test = (
        f"<p class='test'><b>Test.</b> Base rate: self-corrections among the correct sampled "
        f"completions of steps 1..{aha.baseline_steps} = {x0}/{n0}"
        + (f" = {x0 / n0:.3f}" if n0 else "")
        + f". Each {cfg.window}-step window after that (window ends {aha.baseline_steps + cfg.window}"
        f"..{aha.baseline_steps + cfg.window + aha.n_tests - 1}, {aha.n_tests} windows) is compared "
        f"against it with a one-sided Fisher exact test (H1: window rate &gt; base rate); "
        f"significance level α = {cfg.alpha:g} Bonferroni-divided by {aha.n_tests} tests: "
        f"p &lt; {aha.threshold:.2e}. Correct means {html.escape(aha.how_correct)}; "
        f"self-correction means <code>metrics.is_self_correction</code> (a reflection line that "
        f"rejects a candidate, then a new attempt).</p>"
    )
    if aha.note:
        verdict = f"<p><b>No aha moment detected</b>: {html.escape(aha.note)}.</p>"
    elif aha.found:
        x1, n1 = aha.hit
        verdict = (
            f"<p class='aha'><b>Aha moment at step {aha.step}</b> (window {aha.window[0]}..{aha.window[1]}): "
            f"{x1}/{n1} = {x1 / n1:.3f} self-corrections among correct completions vs base "
            f"{x0}/{n0}; p = {aha.p_value:.2e} &lt; {aha.threshold:.2e}.</p>"
        )
    else:
        e, x1, n1, p = aha.best or (0, 0, 0, 1.0)
        verdict = (
            f"<p><b>No aha moment detected.</b> Closest window ends at step {e}: {x1}/{n1}"
            + (f" = {x1 / n1:.3f}" if n1 else "")
            + f" vs base {x0}/{n0}, p = {p:.3g}, needed p &lt; {aha.threshold:.2e}.</p>"
        )
    check = (
        f"<p class='test'><b>Self-check (the corpus planted at step 0 does not count).</b> The base "
        f"model already self-corrects at {x0}/{n0} among correct samples"
        + (
            f" (base_eval.json, held-out, all samples: {run.base_eval['heldout']['self_correction_rate']:.4f})"
            if (run.base_eval or {}).get("heldout", {}).get("self_correction_rate") is not None
            else ""
        )
        + ". A test against a zero rate would have flagged "
        + (f"step {aha.vs_zero_step}" if aha.vs_zero_step else "no step")
        + "; the test above compares against the base rate instead.</p>"
    )
    examples = ""
    if aha.found:
        is_correct, _ = correctness(run.config)
        lo, hi = aha.window
        hits = [
            r
            for r in run.samples
            if lo <= int(r.get("step", 0)) <= hi
            and is_correct(r)
            and is_self_correction(r.get("completion", ""))
        ]
        examples = "<p>Correct self-correcting samples in that window:</p>" + "".join(
            _sample_html(r, True) for r in hits[:4]
        )
    return f'<div id="{anchor}">{verdict}{test}{check}{examples}</div>'


def _sample_html(row: dict[str, Any], correct: bool | None) -> str:
    badge = {True: "✓ correct", False: "✗ wrong", None: "?"}[correct]
    sc = " · self-correction" if is_self_correction(row.get("completion", "")) else ""
    return (
        f"<div class='sample'><div class='meta'>step {html.escape(str(row.get('step')))} · "
        f"reward {html.escape(_fmt(row.get('reward')))} · {badge}{sc}</div>"
        f"<div class='q'>{html.escape(str(row.get('problem', '')))}</div>"
        f"<pre>{highlight(str(row.get('completion', '')))}</pre></div>"
    )


def samples_html(run: Run, per_step: int = 3) -> str:
    steps = sorted({int(r.get("step", 0)) for r in run.samples})
    if not steps:
        return "<p>No samples.jsonl.</p>"
    picks = {"start": steps[0], "middle": steps[len(steps) // 2], "end": steps[-1]}
    is_correct, _ = correctness(run.config)
    out = []
    for name, step in picks.items():
        rows = [r for r in run.samples if int(r.get("step", 0)) == step][:per_step]
        out.append(
            f"<h4>{name}: step {step}</h4>" + "".join(_sample_html(r, is_correct(r)) for r in rows)
        )
    return "".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1150px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} th{background:#f3f3f3}
td:first-child{text-align:left}
pre{background:#fafafa;border:1px solid #ddd;padding:6px;white-space:pre-wrap;margin:.2em 0}
.think{background:#e8f0fe} .answer{background:#e6f4ea;font-weight:bold}
mark{background:#ffe08a} .meta{font-size:.85em;color:#555} .q{font-size:.9em}
.sample{margin:.6em 0} .aha{color:#0a5;font-size:1.1em} .test{font-size:.9em;color:#444}
img{max-width:100%} nav a{margin-right:1em} .note{color:#a50}
"""


def _img(data: bytes | None, alt: str) -> str:
    if data is None:
        return f"<p class='note'>No data for {html.escape(alt)}.</p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def build_html(
    runs: list[Run],
    ahas: list[AhaResult],
    curves: bytes | None,
    aha_png: bytes | None,
    notes: list[str],
    cfg: ReportConfig,
) -> str:
    title = "ahamoment report: " + ", ".join(r.label for r in runs)
    nav = [
        "<a href='#config'>config</a>",
        "<a href='#final'>final table</a>",
        "<a href='#dynamics'>dynamics</a>",
        "<a href='#curves'>curves</a>",
        "<a href='#aha'>aha moment</a>",
        "<a href='#samples'>samples</a>",
    ]
    for i, (run, aha) in enumerate(zip(runs, ahas)):
        if aha.found:
            nav.append(f"<a href='#aha-{i}'>{html.escape(run.label)}: aha at step {aha.step}</a>")
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>{''.join(nav)}</nav>",
        "<h2 id='config'>Config</h2>",
    ]
    for run in runs:
        status = f"{len(run.metrics)} steps logged" + (
            "" if run.summary else " (no summary.json: partial run)"
        )
        parts.append(
            f"<h3>{html.escape(run.label)}</h3><p class='meta'>{html.escape(str(run.path))} · {status}</p>"
        )
        parts.append(
            f"<details><summary>config.yaml</summary><pre>{html.escape(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>"
        )
    parts.append("<h2 id='final'>Final table</h2>")
    for run in runs:
        parts.append(f"<h3>{html.escape(run.label)}</h3>{summary_html(run)}")
    parts.append("<h2 id='dynamics'>R1-Zero dynamics</h2>")
    for run in runs:
        parts.append(f"<h3>{html.escape(run.label)}</h3>{dynamics_html(run)}")
    parts.append("<h2 id='curves'>Curves</h2>" + _img(curves, "training curves"))
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2 id='aha'>Aha moment</h2>" + _img(aha_png, "self-correction rate"))
    for i, (run, aha) in enumerate(zip(runs, ahas)):
        parts.append(f"<h3>{html.escape(run.label)}</h3>{aha_html(run, aha, f'aha-{i}', cfg)}")
    parts.append("<h2 id='samples'>Samples</h2>")
    parts.append(
        "<p class='meta'>Highlighted: <span class='think'>&lt;think&gt; reasoning</span>, "
        "<span class='answer'>&lt;answer&gt;</span>, <mark>reflection words</mark>.</p>"
    )
    for run in runs:
        parts.append(f"<h3>{html.escape(run.label)}</h3>{samples_html(run)}")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- the stage ---------------------------------------------------------------------------
def report(cfg: ReportConfig, console: Console | None = None) -> Path:
    """Write report.html, curves.png and aha.png; return the path of report.html."""
    console = console or Console()
    paths = [Path(r) for r in cfg.runs]
    runs = [load_run(p, label) for p, label in zip(paths, run_labels(paths))]
    if cfg.out:
        out = Path(cfg.out)
    elif len(runs) == 1:
        out = paths[0] / "report"
    else:
        out = Path("runs") / f"report-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    ahas = [
        detect_aha(r.samples, r.config, cfg.baseline_steps, cfg.window, cfg.alpha) for r in runs
    ]
    curves, notes = plot_curves(runs, cfg.smooth)
    aha_png = plot_aha(runs, ahas, cfg.window)
    for name, data in (("curves.png", curves), ("aha.png", aha_png)):
        if data is not None:
            (out / name).write_bytes(data)
    page = out / "report.html"
    page.write_text(build_html(runs, ahas, curves, aha_png, notes, cfg), encoding="utf-8")
    for note in notes:
        console.print(f"[yellow]{note}")
    for run, aha in zip(runs, ahas):
        x0, n0 = aha.base
        if aha.found:
            x1, n1 = aha.hit
            console.print(
                f"{run.label}: aha moment at step {aha.step}: {x1}/{n1} self-corrections among "
                f"correct samples vs base {x0}/{n0} (Fisher p = {aha.p_value:.2e} < {aha.threshold:.2e})"
            )
        else:
            detail = aha.note or (
                f"closest window ends at step {aha.best[0]}: {aha.best[1]}/{aha.best[2]}, "
                f"p = {aha.best[3]:.3g}, needed < {aha.threshold:.2e}"
                if aha.best
                else "no window with correct samples"
            )
            console.print(f"{run.label}: no aha moment detected (base {x0}/{n0}; {detail})")
    for run in runs:
        rows = dynamics(run)
        if rows:
            console.print(
                f"{run.label}: dynamics (final / step 0, min over the last 20%): "
                + "; ".join(
                    f"{d.key} {_ratio(d.final_ratio)} / {_ratio(d.tail_ratio)} (need {d.need}x)"
                    for d in rows
                )
                + (" — all met" if all(d.met for d in rows) else "")
            )
    console.print(f"report: {page}")
    return page


def main(argv: list[str] | None = None) -> int:
    from ahamoment.cli import run_stage

    return run_stage("report", argv)


if __name__ == "__main__":
    raise SystemExit(main())
