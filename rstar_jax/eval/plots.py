"""The report's plots as PNG files (matplotlib, headless): test-time scaling, accuracy and coverage per round.

Inputs are the machine-readable summaries' rows (`rstar_jax.eval.report`), so a plot can be redrawn from
any run directory without recomputing anything.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_curve(rows: Sequence[Mapping], path: str, title: str = "") -> None:
    """Accuracy vs N (log2 axis) per method, with the 95% interval as a band; single-N methods as points."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["n"], 100 * r["accuracy"], 100 * r["ci95"][0], 100 * r["ci95"][1])
                     for r in rows if r["method"] == method)
        n, acc, lo, hi = zip(*pts)
        ax.plot(n, acc, marker="o", label=method)
        if len(pts) > 1:
            ax.fill_between(n, lo, hi, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples / trajectories)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "test-time scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def per_round(series: Mapping[str, Sequence[float | None]], path: str, *, ylabel: str, title: str) -> None:
    """One line per series over rounds 0..R (None: not measured that round), e.g. {"policy greedy": [...]}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        pts = [(k, 100 * v) for k, v in enumerate(values) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
