"""Readable summaries of a federated run: the round table and the curves (``metrics.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = (
    ("train", "train-loss", "local training loss"),
    ("heldout", "auc-mean", "held-out zero-shot AUC (mean)"),
    ("heldout", "r5", "held-out retrieval R@5"),
    ("eval", "auc-mean", "site test zero-shot AUC (mean)"),
)


def read_rounds(run_dir: str | Path) -> list[dict]:
    """One record per completed round; a repeated round (after a resume) keeps its last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rounds: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            rounds[int(rec["round"])] = rec
    return [rounds[k] for k in sorted(rounds)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Write the run's curves to ``curves.png`` (or ``out``); nothing before the first round."""
    rounds = read_rounds(run_dir)
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (section, key, title) in zip(axes, CURVES):
        xs = [r["round"] for r in rounds if key in r.get(section, {})]
        ys = [r[section][key] for r in rounds if key in r.get(section, {})]
        ax.plot(xs, ys, marker="o")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
