"""Pictures of results people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_accuracy_matrix_plot(matrix: dict, probe_accuracy: dict[str, float | None], path: Path) -> None:
    """Heat map of R[i][j] (rows: after learning, columns: task), with the probe as a last row."""
    tasks = matrix["tasks"]
    rows = matrix["rows"]
    values = [[row["accuracy"].get(task, float("nan")) for task in tasks] for row in rows]
    row_names = [f"after {row['learned']}" for row in rows]
    values.append([probe_accuracy.get(task) if probe_accuracy.get(task) is not None else float("nan")
                   for task in tasks])
    row_names.append("probe (reference)")

    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 1.2 + 0.5 * len(values)))
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(row_names)), row_names)
    axes.axhline(len(rows) - 0.5, color="white", linewidth=2)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                axes.text(j, i, f"{value:.3f}", ha="center", va="center",
                          color="black" if value > 0.6 else "white", fontsize=8)
    axes.set_title("Accuracy matrix (row: after learning, column: task)")
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
