"""The CMC figure (cmc_<split>.png of eval_3rtpr.py): every row's curve of `trpr.metrics.cmc.cmc_curve`."""
from __future__ import annotations

from pathlib import Path

LINE_STYLES = ("-", "--", ":", "-.")


def plot_cmc(curves: dict[str, list[float]], path: str | Path, title: str, period: int = 10) -> Path:
    """Write one PNG with every curve (label -> CMC percent at ranks 1..K) and return its path.

    Curve i gets colour i % period and line style i // period, so with `period` = rows per checkpoint
    each row keeps its colour and each checkpoint its line style.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colours = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, (label, curve) in enumerate(curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, color=colours[i % period % len(colours)],
                linestyle=LINE_STYLES[(i // period) % len(LINE_STYLES)], marker="o", markersize=2.5,
                linewidth=1.2, label=label)
    max_rank = max((len(c) for c in curves.values()), default=1)
    ax.set_xlim(1, max_rank)
    ax.set_xticks(range(1, max_rank + 1))
    ax.set_xlabel("rank k")
    ax.set_ylabel("matching rate within top k (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 9 else 1, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
