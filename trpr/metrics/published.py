"""Published text->image results of other methods (CLIP ViT-B/16 backbones), docs/method.md §9.

Each number is a percentage as printed by the method's authors; ``None`` marks a figure the
source does not report (CFAM gives no mINP). These are "reported" rows: we did not re-run them.
"""
from __future__ import annotations

from dataclasses import dataclass

METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")

# Where the table of docs/method.md §9 comes from; kept with every row so a leaderboard can cite it.
TABLE_SOURCE = "docs/method.md §9 (from the IRRA, RDE and ICL papers/READMEs)"


@dataclass(frozen=True)
class PublishedResult:
    """One reported row: ``method`` on ``dataset`` with metrics in percent (None = not reported)."""

    method: str
    dataset: str
    metrics: dict
    source: str = TABLE_SOURCE


def _row(method: str, dataset: str, r1, r5, r10, map_, minp) -> PublishedResult:
    values = dict(zip(METRIC_NAMES, (r1, r5, r10, map_, minp)))
    return PublishedResult(method=method, dataset=dataset, metrics=values)


PUBLISHED_RESULTS = (
    _row("CLIP fine-tune", "cuhk-pedes", 68.19, 86.47, 91.47, 61.12, 44.86),
    _row("CLIP fine-tune", "icfg-pedes", 56.74, 75.72, 82.26, 31.84, 5.03),
    _row("CLIP fine-tune", "rstpreid", 54.05, 80.70, 88.00, 43.41, 22.31),
    _row("IRRA (CVPR'23)", "cuhk-pedes", 73.38, 89.93, 93.71, 66.13, 50.24),
    _row("IRRA (CVPR'23)", "icfg-pedes", 63.46, 80.24, 85.82, 38.05, 7.92),
    _row("IRRA (CVPR'23)", "rstpreid", 60.20, 81.30, 88.20, 47.17, 25.28),
    _row("TBPS-CLIP (AAAI'24)", "cuhk-pedes", 73.54, 88.19, 92.35, 65.38, 49.25),
    _row("TBPS-CLIP (AAAI'24)", "icfg-pedes", 65.05, 80.34, 85.47, 39.83, 7.87),
    _row("TBPS-CLIP (AAAI'24)", "rstpreid", 62.10, 81.90, 87.75, 48.00, 25.86),
    _row("CFAM (CVPR'24)", "cuhk-pedes", 75.60, 90.53, 94.36, 67.27, None),
    _row("CFAM (CVPR'24)", "icfg-pedes", 65.38, 81.17, 86.35, 39.42, None),
    _row("CFAM (CVPR'24)", "rstpreid", 62.45, 83.55, 91.10, 49.50, None),
    _row("RDE (CVPR'24)", "cuhk-pedes", 75.94, 90.14, 94.12, 67.56, 51.44),
    _row("RDE (CVPR'24)", "icfg-pedes", 67.68, 82.47, 87.36, 40.06, 7.87),
    _row("RDE (CVPR'24)", "rstpreid", 65.35, 83.95, 89.90, 50.88, 28.08),
)


def canonical_dataset(name: str) -> str:
    """Lower-case benchmark key (``CUHK-PEDES`` -> ``cuhk-pedes``, ``RSTPReid`` -> ``rstpreid``)."""
    return name.strip().lower()


def published_for(dataset: str) -> list[PublishedResult]:
    """The reported rows for ``dataset`` (any accepted spelling); empty for synth-pedes and unknown names."""
    key = canonical_dataset(dataset)
    return [row for row in PUBLISHED_RESULTS if row.dataset == key]
