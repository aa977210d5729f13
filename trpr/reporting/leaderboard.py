"""Leaderboard tables: our evaluation rows, seed mean ± std rows and published rows, as Markdown.

All metric values are percentages. A row's ``std`` is the sample standard deviation (ddof=1) over
the seeds it summarises, ``None`` for single runs and reported rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from trpr.metrics.published import METRIC_NAMES, PublishedResult


@dataclass
class LeaderboardRow:
    """One line of a leaderboard.

    method:  what the row shows, e.g. ``3RTPR seed0 A+B/GE+FS`` or ``RDE (CVPR'24)``.
    metrics: {"R1","R5","R10","mAP","mINP"} -> percent (None = not reported).
    kind:    "ours" (one checkpoint), "mean" (mean over checkpoints of one config) or "reported".
    std:     per-metric sample std for "mean" rows.
    source:  where a reported number comes from; the checkpoint path(s) for our rows.
    """

    method: str
    metrics: dict
    kind: str = "ours"
    std: dict | None = None
    source: str = ""
    count: int = 1


def reported_rows(published: list[PublishedResult]) -> list[LeaderboardRow]:
    """Published results as leaderboard rows (kind "reported", with their source)."""
    return [LeaderboardRow(method=p.method, metrics=dict(p.metrics), kind="reported", source=p.source)
            for p in published]


def mean_std_rows(label: str, per_checkpoint: list[dict[str, dict[str, float]]],
                  sources: list[str]) -> list[LeaderboardRow]:
    """Mean ± sample std over checkpoints of one config, for every row key they all share.

    per_checkpoint: one {row_key -> {metric -> percent}} per checkpoint (at least 2).
    Returns one "mean" row per row key, named ``f"{label} {row_key}"``, in the first checkpoint's order.
    """
    if len(per_checkpoint) < 2:
        raise ValueError(f"mean ± std needs at least 2 checkpoints, got {len(per_checkpoint)}")
    shared = [key for key in per_checkpoint[0] if all(key in rows for rows in per_checkpoint)]
    out = []
    for key in shared:
        mean, std = {}, {}
        for metric in METRIC_NAMES:
            values = [rows[key][metric] for rows in per_checkpoint]
            mu = sum(values) / len(values)
            var = sum((v - mu) ** 2 for v in values) / (len(values) - 1)
            mean[metric], std[metric] = mu, math.sqrt(var)
        out.append(LeaderboardRow(method=f"{label} {key}", metrics=mean, kind="mean", std=std,
                                  source=", ".join(sources), count=len(per_checkpoint)))
    return out


def sort_by_r1(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Rows sorted by R@1, best first (stable: equal R@1 keeps the given order)."""
    return sorted(rows, key=lambda row: -row.metrics["R1"])


def _cell(value, std=None) -> str:
    if value is None:
        return "–"
    if std is None:
        return f"{value:.2f}"
    return f"{value:.2f} ± {std:.2f}"


_KIND_LABEL = {"ours": "ours", "mean": "ours (mean ± std)", "reported": "reported"}


def markdown_table(rows: list[LeaderboardRow], rank: bool = False) -> str:
    """A Markdown table: method | R@1 | R@5 | R@10 | mAP | mINP | type | source (+ a # column when ``rank``)."""
    header = ["method", "R@1", "R@5", "R@10", "mAP", "mINP", "type", "source"]
    if rank:
        header = ["#"] + header
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for position, row in enumerate(rows, start=1):
        std = row.std or {}
        cells = [row.method] + [_cell(row.metrics.get(m), std.get(m)) for m in METRIC_NAMES]
        kind = _KIND_LABEL[row.kind] + (f", n={row.count}" if row.kind == "mean" else "")
        cells += [kind, row.source]
        if rank:
            cells = [str(position)] + cells
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
