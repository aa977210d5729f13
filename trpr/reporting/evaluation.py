"""Evaluation reports: row naming, per-checkpoint results, seed groups (mean ± std), the leaderboard
Markdown (with the published rows of docs/method.md §9), results.json and the CMC plot.

Row keys (`modeling.pair.ROW_KEYS`): "<models>/<score>" with models A, B (the two reciprocal models) or
A+B (their ensemble) and score GE (global embeddings), FS (fused) or GE+FS; image->text rows carry the
prefix "i2t:".
All metric values are percentages.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from trpr.metrics.published import canonical_dataset, published_for
from trpr.modeling.pair import I2T_PREFIX, ROW_KEYS
from trpr.reporting.cmc import plot_cmc
from trpr.reporting.leaderboard import LeaderboardRow, markdown_table, mean_std_rows, reported_rows, sort_by_r1

CMC_MAX_RANK = 20


@dataclass
class CheckpointResult:
    """One checkpoint's evaluation.

    name: label in tables; path: as given on the command line; pair_dir: the pair folder evaluated;
    rows: {row key -> {"R1","R5","R10","mAP","mINP"} percent}; cmc: text->image {row key -> [R@1..R@20]
    percent}; fingerprint: config_fingerprint (equal = seeds of one recipe); seconds: timings.
    """

    name: str
    path: str
    pair_dir: str
    image_size: tuple
    rows: dict
    cmc: dict
    fingerprint: str
    seconds: dict = field(default_factory=dict)


# Config entries that differ between seeds of one recipe or do not change the trained weights.
_RUN_ONLY_PATHS = frozenset({"data.root", "data.num_workers", "model.gradient_checkpointing", "train.log_every",
                             "eval.batch_size", "eval.every", "logging", "output_dir", "resume"})


def _without_run_only_keys(value, prefix: str = ""):
    """The config without seeds (any key containing "seed"), data/output folders, worker counts and
    logging (recursively): what two runs of the same recipe share."""
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            path = f"{prefix}{key}"
            if "seed" in str(key).lower() or path in _RUN_ONLY_PATHS:
                continue
            kept[key] = _without_run_only_keys(item, f"{path}.")
        return kept
    return value


def config_fingerprint(run_config: dict | None, model_description: dict) -> str:
    """Short hash of what makes a recipe: the run's config.yaml without seeds / folders / logging, or,
    for a bare pair folder (no run config), `model_description` (the models' settings and CLIP config).
    Checkpoints with equal fingerprints are seeds of one config and get a mean ± std row."""
    recipe = _without_run_only_keys(run_config) if run_config is not None else model_description
    blob = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_names_unique(results: list[CheckpointResult]) -> None:
    """Suffix repeated names with #2, #3, ... (in place)."""
    seen: dict[str, int] = {}
    for result in results:
        name = result.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            result.name = f"{name}#{seen[name]}"


def seed_groups(results: list[CheckpointResult]) -> list[list[CheckpointResult]]:
    """Checkpoints grouped by config fingerprint (groups of 2 or more only, in first-seen order)."""
    groups: dict[str, list[CheckpointResult]] = {}
    for result in results:
        groups.setdefault(result.fingerprint, []).append(result)
    return [members for members in groups.values() if len(members) > 1]


def _group_label(members: list[CheckpointResult]) -> str:
    prefix = os.path.commonprefix([m.name for m in members]).rstrip("_-/.# ")
    return f"3RTPR {prefix or 'seeds'} (mean of {len(members)})"


def leaderboard_rows(results: list[CheckpointResult], dataset: str, *, with_published: bool,
                     prefix: str = "") -> list[LeaderboardRow]:
    """Rows of one direction ("" = text->image, "i2t:" = image->text): every checkpoint's rows, one
    mean ± std row per row key for each config with several checkpoints, and (text->image with
    `with_published`) the reported rows of docs/method.md §9, sorted by R@1."""
    keys = [f"{prefix}{key}" for key in ROW_KEYS]
    rows = []
    for result in results:
        for key in keys:
            rows.append(LeaderboardRow(method=f"3RTPR {result.name} {key}",
                                       metrics=result.rows[key], source=result.pair_dir))
    for members in seed_groups(results):
        per_checkpoint = [{key: m.rows[key] for key in keys} for m in members]
        rows += mean_std_rows(_group_label(members), per_checkpoint, [m.name for m in members])
    if with_published and not prefix:
        rows = sort_by_r1(rows + reported_rows(published_for(dataset)))
    return rows


def render_leaderboard(results: list[CheckpointResult], dataset: str, split: str, *, with_published: bool,
                       i2t: bool, cmc_png: str | None) -> str:
    """The Markdown report: text->image table (+ published rows), image->text table, CMC figure."""
    lines = [f"# 3RTPR evaluation: {dataset}, split {split}", "",
             "Metrics in percent (docs/method.md §8). A, B: the two reciprocal models; A+B: their ensemble "
             "(sum of similarities). GE: global embeddings; FS: fused representations; GE+FS: both.", "",
             "## Text → image", ""]
    t2i = leaderboard_rows(results, dataset, with_published=with_published)
    if with_published:
        if published_for(dataset):
            lines += ["Sorted by R@1. \"reported\" rows are published numbers (CLIP ViT-B/16), not re-run here.", ""]
        else:
            lines += [f"No published results exist for {dataset!r} (only the three public benchmarks "
                      "cuhk-pedes, icfg-pedes and rstpreid have them): our rows only, sorted by R@1.", ""]
    lines += [markdown_table(t2i, rank=with_published), ""]
    if i2t:
        lines += ["## Image → text", "", markdown_table(leaderboard_rows(results, dataset, with_published=False,
                                                                         prefix=I2T_PREFIX)), ""]
    if cmc_png:
        lines += ["## CMC (text → image)", "", f"![CMC curves]({cmc_png})", ""]
    return "\n".join(lines)


def write_reports(results: list[CheckpointResult], *, dataset: str, split: str, root, out_dir: Path,
                  with_published: bool, i2t: bool) -> dict[str, Path]:
    """Write results.json, leaderboard.md and cmc_<dataset>.png into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmc_name = f"cmc_{re.sub(r'[^A-Za-z0-9_.-]+', '_', canonical_dataset(dataset))}.png"
    several = len(results) > 1
    curves = {(f"{r.name} {key}" if several else key): curve
              for r in results for key, curve in r.cmc.items()}
    plot_cmc(curves, out_dir / cmc_name, title=f"CMC, text → image: {dataset} ({split})", period=len(ROW_KEYS))
    groups = []
    for members in seed_groups(results):
        keys = list(members[0].rows)
        mean_rows = mean_std_rows(_group_label(members), [m.rows for m in members],
                                  [m.name for m in members])
        groups.append({"label": _group_label(members), "checkpoints": [m.name for m in members],
                       "fingerprint": members[0].fingerprint,
                       "mean": {key: row.metrics for key, row in zip(keys, mean_rows)},
                       "std": {key: row.std for key, row in zip(keys, mean_rows)}})
    report = {
        "dataset": dataset, "split": split, "root": None if root is None else str(root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics_unit": "percent", "i2t": i2t, "leaderboard": with_published,
        "checkpoints": [{"name": r.name, "path": r.path,
                         "pair_dir": r.pair_dir, "image_size": list(r.image_size),
                         "config_fingerprint": r.fingerprint, "rows": r.rows, "cmc": r.cmc,
                         "seconds": r.seconds} for r in results],
        "seed_groups": groups,
        "published": [{"method": p.method, "metrics": p.metrics, "source": p.source}
                      for p in published_for(dataset)] if with_published else [],
        "cmc_plot": cmc_name,
    }
    paths = {"results": out_dir / "results.json", "leaderboard": out_dir / "leaderboard.md", "cmc": out_dir / cmc_name}
    paths["results"].write_text(json.dumps(report, indent=2) + "\n")
    paths["leaderboard"].write_text(render_leaderboard(results, dataset, split, with_published=with_published,
                                                       i2t=i2t, cmc_png=cmc_name))
    return paths
