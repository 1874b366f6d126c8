"""The frontier plot: per cost axis and dataset, the test quality of each family's dev choice against the
budget, with intervals (``frontier.Frontier`` makes the selections)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from cascade.bench.frontier import AXES, AXIS_BUDGETS


def plot_frontier(frontiers: dict, families: Sequence[str], path: Path, title: str) -> None:
    """One row per cost axis, one column per dataset: the test-split quality of each family's dev-chosen
    configuration against the budget on that axis, with 95 % bootstrap intervals at the reported budgets
    and the test quality of draft-only and target-only as dashed lines (quality, not gap recovered: with a
    small draft/target difference the gap's interval spans several times the gap itself).
    ``frontiers``: dataset -> ``frontier.Frontier``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(frontiers)
    fig, axes = plt.subplots(len(AXES), len(datasets), figsize=(6.5 * len(datasets), 4.2 * len(AXES)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    colors = {fam: cmap(i % 20) for i, fam in enumerate(families)}
    for j, ds in enumerate(datasets):
        fr = frontiers[ds]
        for i, axis in enumerate(AXES):
            ax = axes[i][j]
            budgets = AXIS_BUDGETS[axis]
            top = 1.0 if max(budgets) < 1.0 else 1.5 * max(budgets)  # fractions of target-only up to 1, or ratios
            grid = [top * k / 30 for k in range(31)]
            for fam in families:
                if fam not in fr.runs:
                    continue
                ax.step(grid, [fr.select(fam, axis, b).test.quality for b in grid], where="post", color=colors[fam],
                        label=fam, ls=":" if fam == "oracle" else "-")
                for k, b in enumerate(budgets):
                    s = fr.select(fam, axis, b)
                    lo, hi = s.quality_ci
                    if not math.isnan(lo):
                        x = b + top * 0.004 * (families.index(fam) - len(families) / 2)  # spread the bars apart
                        ax.errorbar([x], [s.test.quality], yerr=[[s.test.quality - lo], [hi - s.test.quality]], fmt="o",
                                    ms=3, color=colors[fam], capsize=2, lw=0.8)
            for name, q in (("draft-only", fr.draft_test.mean()), ("target-only", fr.target_test.mean())):
                ax.axhline(q, color="black", lw=0.8, ls="--")
                ax.annotate(name, (top, q), textcoords="offset points", xytext=(-60, 3), fontsize=7)
            ax.set_title(f"{ds} (test n = {len(fr.test_idx)}): budget on {axis}", fontsize=10)
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel("test quality")
            ax.set_xlim(0, top)
            ax.grid(alpha=0.3)
            for b in budgets:
                ax.axvline(b, color="grey", lw=0.5, ls=":")
    axes[0][0].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(title + "\nchosen on dev at each budget, shown on test; bars: 95 % bootstrap intervals", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (4.2 * len(AXES))))  # room for the two-line title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
