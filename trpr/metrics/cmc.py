"""Cumulative matching characteristic (CMC): R@1..R@K from each query's first-match rank (its plot:
`trpr.reporting.cmc.plot_cmc`)."""
from __future__ import annotations

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
