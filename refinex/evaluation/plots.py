"""Pictures of a run's edit statistics and evaluation, for people who would rather look than
read (pure: matplotlib only, no Spark; every number plotted is computed by the caller)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


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


OPERATION_BUCKETS: tuple[tuple[int, int], ...] = (
    (0, 0), (1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 200), (201, 10**12),
)
"""Inclusive ranges of operations per document shown as the bars of :func:`plot_operations`."""


def bucket_label(low: int, high: int) -> str:
    """``"3-5"``, ``"7"``, ``">200"``."""
    if high >= 10**12:
        return f">{low - 1}"
    return str(low) if low == high else f"{low}-{high}"


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(width, height))
    return plt, (fig, ax)


def _save(plt: Any, fig: Any, out_path: str | Path, title: str) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_deletion_ratios(
    hist: Sequence[int], out_path: str | Path, title: str, expert_hist: Optional[Sequence[int]] = None,
) -> Path:
    """Write a PNG: documents per deletion-ratio bin (equal bins over [0, 1], the last one
    including 1.0), with the expert's histogram as an outline when given."""
    plt, (fig, ax) = _figure(8, 3.6)
    n_bins = max(1, len(hist))
    width = 1.0 / n_bins
    lefts = [i * width for i in range(n_bins)]
    ax.bar(lefts, list(hist), width=width, align="edge", color="#4c72b0", edgecolor="white", label="this origin")
    if expert_hist is not None:
        ax.step([*lefts, 1.0], [*expert_hist, expert_hist[-1] if expert_hist else 0], where="post",
                color="#dd8452", linewidth=1.6, label="expert (distilled)")
        ax.legend(fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("deletion ratio (share of characters removed)")
    ax.set_ylabel("documents")
    ax.set_title("deletion ratio per document")
    return _save(plt, fig, out_path, title)


def plot_operations(counts: Mapping[str, Sequence[int]], out_path: str | Path, title: str) -> Path:
    """Write a PNG: documents per number of operations (:data:`OPERATION_BUCKETS`), one bar
    series per kind (``counts[kind][i]`` documents have bucket ``i``'s number of that kind)."""
    plt, (fig, ax) = _figure(9, 3.6)
    labels = [bucket_label(low, high) for low, high in OPERATION_BUCKETS]
    kinds = list(counts)
    width = 0.8 / max(1, len(kinds))
    colors = ("#4c72b0", "#55a868", "#c44e52", "#8172b2")
    for k, kind in enumerate(kinds):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(labels))]
        ax.bar(xs, list(counts[kind]), width=width, label=kind, color=colors[k % len(colors)])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("operations per document")
    ax.set_ylabel("documents")
    ax.set_title("operations per document")
    ax.legend(fontsize=8)
    return _save(plt, fig, out_path, title)


def plot_scores_by_source(rows: Sequence[Mapping[str, Any]], out_path: str | Path, title: str) -> Path:
    """Write a PNG: precision, recall and F1 per scope and score family, with the raw text's
    F1 (the baseline) beside them. ``rows`` are ``evaluations`` rows (``scope`` and the
    metric columns); a family without pages in a scope is left out."""
    groups: list[tuple[str, list[Optional[float]]]] = []
    for row in rows:
        if row.get("snippet_f1") is not None:
            groups.append((f"{row['scope']}\nsnippets",
                           [row["snippet_precision"], row["snippet_recall"], row["snippet_f1"], row["raw_snippet_f1"]]))
        if row.get("bow_f1") is not None:
            groups.append((f"{row['scope']}\nbag of words",
                           [row["bow_precision"], row["bow_recall"], row["bow_f1"], row["raw_bow_f1"]]))
    plt, (fig, ax) = _figure(max(6.0, 1.9 * len(groups) + 2), 4.0)
    names = ("precision", "recall", "F1", "raw text F1")
    colors = ("#4c72b0", "#55a868", "#c44e52", "#b0b0b0")
    width = 0.2
    for k, name in enumerate(names):
        xs = [g - 0.4 + width * (k + 0.5) for g in range(len(groups))]
        values = [values[k] or 0.0 for _, values in groups]
        bars = ax.bar(xs, values, width=width, label=name, color=colors[k], hatch="//" if k == 3 else None)
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
    ax.set_ylim(0, 1.3)  # room for the legend above bars at 1.0
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("score")
    ax.set_title("scores against gold, per source" if groups else "no gold pages: nothing scored")
    ax.legend(fontsize=8, ncol=4, loc="upper center")
    return _save(plt, fig, out_path, title)
