"""Cumulative matching characteristic (CMC): R@1..R@K from each query's first-match rank, and its plot."""
from __future__ import annotations

from pathlib import Path

import torch


def cmc_curve(first_rank: torch.Tensor, max_rank: int = 20) -> list[float]:
    """CMC in percent: entry k-1 = % of queries whose first correct gallery item is within the top k.

    first_rank: LongTensor[Nq], 1-based rank of each query's first match, 0 when the gallery holds
    no match (as returned by ``kernels.retrieval_metrics(..., per_query=True)["first_rank"]``);
    a query without a match never counts, as in R@K.
    Returns ``max_rank`` floats, non-decreasing.
    """
    ranks = torch.as_tensor(first_rank).reshape(-1).to(torch.int64).cpu()
    if ranks.numel() == 0:
        raise ValueError("cmc_curve: no queries (first_rank is empty)")
    counts = torch.bincount(ranks.clamp(min=0, max=max_rank + 1), minlength=max_rank + 2)
    cumulative = torch.cumsum(counts[1:max_rank + 1], dim=0).double()
    return (cumulative * 100.0 / ranks.numel()).tolist()


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
