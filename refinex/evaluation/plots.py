"""Pictures of a run's edit statistics, for people who would rather look than read (pure)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def plot_edit_stats(
    deletion_hist: Sequence[int],
    by_status: Mapping[str, int],
    out_path: str | Path,
    title: str,
) -> Path:
    """Write a PNG: the deletion-ratio histogram (equal bins over [0, 1]) and docs per status.

    ``deletion_hist[i]`` counts documents whose deletion ratio falls in bin ``i`` (the last
    bin includes 1.0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_bins = max(1, len(deletion_hist))
    width = 1.0 / n_bins
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    left.bar([i * width for i in range(n_bins)], list(deletion_hist), width=width, align="edge",
             color="#4c72b0", edgecolor="white")
    left.set_xlim(0, 1)
    left.set_xlabel("deletion ratio (share of characters removed)")
    left.set_ylabel("documents")
    left.set_title("deletion ratio per document")
    statuses = list(by_status)
    right.barh(statuses, [by_status[s] for s in statuses], color="#55a868")
    right.invert_yaxis()
    right.set_xlim(0, max(by_status.values(), default=1) * 1.18 or 1)
    right.set_xlabel("documents")
    right.set_title("status")
    for y, status in enumerate(statuses):
        right.text(by_status[status], y, f" {by_status[status]}", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
