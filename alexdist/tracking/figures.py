"""Figures written into a run directory: the confusion matrix of the latest evaluation."""

from __future__ import annotations

from pathlib import Path

from alexdist.fileio import atomic_path


def confusion_png(path: str | Path, classes: list[str], matrix: list[list[int]], title: str) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), each row shaded by its share of the class and
    annotated with counts; written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display: Slurm nodes, CI
    import matplotlib.pyplot as plt

    k = len(classes)
    shares = [[c / max(1, sum(row)) for c in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for r in range(k):
        for c in range(k):
            if matrix[r][c]:
                ax.text(c, r, str(matrix[r][c]), ha="center", va="center", fontsize=7,
                        color="white" if shares[r][c] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
