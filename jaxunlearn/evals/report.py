"""Markdown tables and matplotlib plots (headless, Agg) from evaluation summaries and metrics.jsonl."""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping, Sequence

from jaxunlearn.data.benchmarks import TOFU_COLUMNS  # (column title, path into a TOFU summary)


def lookup(summary: Mapping, path: Sequence[str]) -> Any:
    cur: Any = summary
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _alpha_eta(label: str, summary: Mapping) -> tuple[float, float] | None:
    """A forget model's (alpha, eta): from the run info, else from an alpha_A[_eta_E] label; None otherwise."""
    run = summary.get("run") or {}
    if isinstance(run.get("alpha"), (int, float)):
        return float(run["alpha"]), float(run.get("eta") or 0.0)
    parts = label.split("_")
    try:
        if parts[0] == "alpha" and len(parts) in (2, 4):
            return float(parts[1]), float(parts[3]) if len(parts) == 4 else 0.0
    except ValueError:
        pass
    return None


def sort_key(label: str, summary: Mapping) -> tuple:
    """Order of rows and plotted points: by method, models without an alpha first (reference,
    memorised, HF folders; by label), then forget models by alpha (numerically) and eta."""
    method = str((summary.get("run") or {}).get("method", ""))
    ae = _alpha_eta(label, summary)
    return (method, 0, 0.0, 0.0, label) if ae is None else (method, 1, ae[0], ae[1], label)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)


def markdown_table(rows: Sequence[tuple[str, Mapping]], columns=TOFU_COLUMNS) -> str:
    """One row per (label, summary); FQ shows n/a when no retain-model values were given."""
    head = "| model | " + " | ".join(c for c, _ in columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    body = ["| " + label + " | " + " | ".join(_fmt(lookup(s, p)) for _, p in columns) + " |" for label, s in rows]
    return "\n".join([head, sep, *body]) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(points: Sequence[Mapping], path: str | pathlib.Path) -> pathlib.Path:
    """Forget quality vs model utility, one point per model, grouped (coloured) by method.

    Each point: {"label", "method", "summary"}. When a model's FQ is undefined (no retain-model
    values), the x axis falls back to 1 - forget ROUGE for every point, and says so.
    """
    plt = _pyplot()
    use_fq = all(lookup(p["summary"], ("forget_quality",)) is not None for p in points)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    methods = sorted({p.get("method", "") for p in points})
    for m in methods:
        pts = [p for p in points if p.get("method", "") == m]
        xs = [lookup(p["summary"], ("forget_quality",)) if use_fq else 1.0 - (lookup(p["summary"], ("forget", "rouge")) or 0.0)
              for p in pts]
        ys = [lookup(p["summary"], ("model_utility",)) or 0.0 for p in pts]
        ax.plot(xs, ys, "o-" if len(pts) > 1 else "o", label=m or None)
        for x, y, p in zip(xs, ys, pts):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if use_fq:
        ax.set_xscale("log")
    ax.set_xlabel("forget quality (KS p-value)" if use_fq else "1 - forget ROUGE-L (FQ undefined: no retain model)")
    ax.set_ylabel("model utility")
    if any(methods):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training(records: Sequence[Mapping], path: str | pathlib.Path, keys: Sequence[str] | None = None) -> pathlib.Path | None:
    """Numeric metrics over steps from metrics.jsonl records, one panel per metric, one line per stage."""
    rows = [r for r in records if isinstance(r.get("step"), (int, float)) and "event" not in r]
    if not rows:
        return None
    skip = {"step", "epoch", "stage"}
    if keys is None:
        keys = sorted({k for r in rows for k, v in r.items()
                       if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.0 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for stage in sorted({str(r.get("stage", "")) for r in rows}):
            pts = [(r["step"], r[key]) for r in rows if str(r.get("stage", "")) == stage and isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=stage or None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if len({str(r.get("stage", "")) for r in rows}) > 1:
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
