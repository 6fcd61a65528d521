"""PNG figures of evaluation results (matplotlib, no display needed; ``pip install 'unlearn-fast[plot]'``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unlearn_fast.evaluate import SPLITS


def plot_answer_probs(results_by_stage: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Bar chart of the mean answer probability of each split, one bar per stage (before/after).

    Raises ImportError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'unlearn-fast[plot]'") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(results_by_stage)
    width = 0.8 / max(len(stages), 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, stage in enumerate(stages):
        values = [results_by_stage[stage][split]["answer_prob"] for split in SPLITS]
        positions = [s + (i - (len(stages) - 1) / 2) * width for s in range(len(SPLITS))]
        bars = ax.bar(positions, values, width, label=stage)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(SPLITS)), SPLITS)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean answer probability")
    ax.legend(frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
