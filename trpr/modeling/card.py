"""Model cards of a trained ReciprocalPair, generated from the run's record (never typed by hand).

A pair may carry a *run record* (`pair.run_record`): {"config": the run's resolved config (config.yaml),
"results": {label: {"split", "dataset", "rows": {row: {"R1","R5","R10","mAP","mINP"}}}}}. The trainer
sets the config when it builds the pair; `read_run_record(run_dir)` rebuilds the whole record from a run
folder (config.yaml, the best validation epoch of metrics.jsonl, test_metrics.json, and any evaluation
results.json under it); `evaluation.checkpoints.load_pair` attaches it to a pair loaded from a run
folder. `ReciprocalPair.save_pretrained` (and so `push_to_hub`) writes the record into pair.json and
the card below into README.md: base model, datasets, noise rate, training recipe, R@1/R@5/R@10/mAP/mINP
per evaluated split in the Hub's `model-index` metadata (huggingface_hub ModelCardData / EvalResult),
intended use, limitations (privacy and surveillance), citation.

    python -m trpr.modeling.card RUN_DIR --save-to DIR        # the selected checkpoint + its card
    python -m trpr.modeling.card RUN_DIR --push-to-hub org/name
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .hub import HUB_TAGS, LIBRARY_NAME

METRICS = (("R1", "recall", "R@1"), ("R5", "recall", "R@5"), ("R10", "recall", "R@10"),
           ("mAP", "map", "mAP"), ("mINP", "minp", "mINP"))
TASK_TYPE = "text-to-image"
TASK_NAME = "Text-based person retrieval"
# Hub dataset ids where one exists; other datasets are named as the project names them
HUB_DATASETS = {}
CITATION = """@Article{Nguyen25TIP,
  author  = {Anh D. Nguyen and Hoa N. Nguyen},
  title   = {Enhancing Text-Based Person Retrieval by Combining Fused Representation and Reciprocal Learning With Adaptive Loss Refinement},
  journal = {IEEE Transactions on Image Processing},
  year    = {2025}, volume = {34}, pages = {5147--5157}, doi = {10.1109/TIP.2025.3594880}
}"""
LIMITATIONS = (
    "Identifying people from a description raises privacy and surveillance concerns. A person-retrieval "
    "model can be used to track individuals across cameras or photo collections without their knowledge or "
    "consent; do not use it to identify, monitor or profile people who have not agreed to it, and check the "
    "laws that apply to you (e.g. the GDPR in the EU treats such processing of people's images as sensitive). "
    "The model ranks images by similarity and is wrong often (see the R@1 above): a high score is not an "
    "identification and must never be the basis of a decision about a person. It inherits the biases of its "
    "training data (clothing, pose, camera views, the vocabulary and language of the captions, English only) "
    "and of the CLIP backbone; quality on other populations, cameras or caption styles is unmeasured.")


def _backbone_name(config: dict) -> str | None:
    backbone = (config.get("model") or {}).get("backbone")
    return backbone if isinstance(backbone, str) else None


def _dataset_name(config: dict) -> str | None:
    return (config.get("data") or {}).get("dataset")


def card_data(record: dict | None, model_name: str = "3rtpr") -> ModelCardData:
    """The card's metadata: library, tags, base model, datasets and, per evaluated split and metric of the
    selection row (the run's eval.select_row, else A+B/GE+FS), an EvalResult (the `model-index`)."""
    record = record or {}
    config = record.get("config") or {}
    datasets = sorted({d for d in [_dataset_name(config)] + [r.get("dataset") for r in (record.get("results") or {}).values()] if d})
    row = ((config.get("eval") or {}).get("select_row")) or "A+B/GE+FS"
    if str(row).startswith("max("):  # a max(...) selection rule: its first row
        row = str(row)[4:-1].split(",")[0].strip()
    results = []
    for label, result in (record.get("results") or {}).items():
        values = (result.get("rows") or {}).get(row)
        if not values:
            continue
        dataset = result.get("dataset") or _dataset_name(config) or "unknown"
        for key, metric_type, metric_name in METRICS:
            if key in values:
                results.append(EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=HUB_DATASETS.get(dataset, dataset),
                                          dataset_name=dataset, dataset_split=result.get("split") or label,
                                          metric_type=metric_type, metric_name=f"{metric_name} ({row}, {label})",
                                          metric_value=round(float(values[key]), 2)))
    return ModelCardData(model_name=model_name, library_name=LIBRARY_NAME, tags=list(HUB_TAGS),
                         base_model=_backbone_name(config), datasets=[HUB_DATASETS.get(d, d) for d in datasets] or None,
                         eval_results=results or None, pipeline_tag=None)


def _recipe_lines(config: dict) -> list[str]:
    """The training recipe in a few lines, from the config (only what it holds)."""
    def get(section, key, default=None):
        return (config.get(section) or {}).get(key, default)

    backbone = get("model", "backbone")
    backbone_text = (f"`{backbone}` (pretrained)" if isinstance(backbone, str)
                     else f"a small CLIP trained from scratch ({json.dumps(backbone, sort_keys=True)})" if backbone else None)
    lines = [
        ("dataset", f"{get('data', 'dataset')}" if get("data", "dataset") else None),
        ("noise rate", f"{get('data', 'noise_rate', 0.0):g} (fraction of captions shuffled)" if config.get("data") else None),
        ("backbone", backbone_text),
        ("image size", "×".join(str(v) for v in get("data", "image_size", [])) or None),
        ("fused heads", f"select_ratio {get('model', 'select_ratio')}, fused_dim {get('model', 'fused_dim')}, "
                        f"image_tokens {get('model', 'image_tokens')}" if config.get("model") else None),
        ("loss", f"λ_SDM {get('loss', 'lambda_sdm')}, λ_TRL {get('loss', 'lambda_trl')}" if config.get("loss") else None),
        ("adaptive loss refinement", (f"from epoch {get('alr', 'start_epoch')}, {get('alr', 'models')} model(s)"
                                      if get("alr", "enabled") else "off") if config.get("alr") else None),
        ("schedule", f"{get('train', 'epochs')} epochs, global batch {get('train', 'batch_size')}, "
                     f"lr backbone {get('optim', 'backbone_lr')} / heads {get('optim', 'head_lr')}, "
                     f"warm-up {get('optim', 'warmup_epochs')} epochs then cosine" if config.get("train") else None),
        ("seed", config.get("seed")),
        ("model selection", f"best R@1 of {get('eval', 'select_row')} on {get('eval', 'split')}" if config.get("eval") else None),
    ]
    return [f"- {name}: {value}" for name, value in lines if value is not None]


def _results_table(record: dict) -> list[str]:
    results = record.get("results") or {}
    if not results:
        return ["No evaluation results were recorded with this checkpoint."]
    lines = ["| split | row | R@1 | R@5 | R@10 | mAP | mINP |", "|---|---|---|---|---|---|---|"]
    for label, result in results.items():
        for row, values in (result.get("rows") or {}).items():
            lines.append(f"| {label} ({result.get('dataset', '?')}) | {row} | "
                         + " | ".join(f"{values[k]:.2f}" if k in values else "–" for k, _, _ in METRICS) + " |")
    return lines


def model_card(pair, record: dict | None = None, model_name: str = "3rtpr") -> ModelCard:
    """The README.md of a saved pair: metadata (`card_data`) + description, recipe, results, use, limits."""
    record = record if record is not None else getattr(pair, "run_record", None) or {}
    config = record.get("config") or {}
    data = card_data(record, model_name)
    model = pair.a
    height, width = model.image_size
    body = [
        f"# {model_name}: 3RTPR reciprocal pair", "",
        "Text-based person retrieval: a CLIP dual encoder with fused representations, trained as a reciprocal "
        "pair with adaptive loss refinement (3RTPR, IEEE TIP 2025). `model_a/` and `model_b/` are TRPRModel "
        "folders; the ensemble score A+B is the sum of their similarities.", "",
        f"- input: {height}×{width} pixels; joint width {model.embed_dim}; fused heads: select_ratio "
        f"{model.select_ratio}, fused_dim {model.fused_dim}", "",
        "## Training", "",
        *(_recipe_lines(config) or ["No training record was saved with this checkpoint."]), "",
        "## Evaluation", "",
        "Text-to-image retrieval, percent (R@k: a correct image in the top k; mAP; mINP).", "",
        *_results_table(record), "",
        "## Use", "",
        "```python",
        "from trpr.modeling import ReciprocalPair",
        "pair = ReciprocalPair.from_pretrained(\"this-folder-or-repo\")",
        "```",
        "or search a folder of photos: `python eval_3rtpr.py search \"a man in a blue jacket\" --checkpoint "
        "this-folder --gallery DIR`, or `3rtpr-app --checkpoint this-folder --gallery DIR`.", "",
        "Intended use: research on text-based person retrieval, and searching one's own photo collections.", "",
        "## Limitations and risks", "",
        LIMITATIONS, "",
        "## Citation", "",
        "```bibtex", CITATION, "```", "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


# ----------------------------------------------------------------------------------- run records
def _rows(metrics: dict) -> dict:
    """The {row: {metric: value}} part of a metrics mapping (drops "checkpoint" and other scalars)."""
    return {row: values for row, values in metrics.items()
            if isinstance(values, dict) and any(k in values for k, _, _ in METRICS)}


def read_run_record(run_dir: str | Path) -> dict:
    """{"config", "results"} of a run folder: config.yaml; the validation rows of the epoch best/ was saved
    at (metrics.jsonl's last record's best_epoch); test_metrics.json (--final-test); every results.json
    that eval_3rtpr.py wrote into a folder inside the run (its dataset and split). Damaged files and
    lines are skipped (loading a checkpoint must not fail over its card)."""
    import yaml

    from trpr.runtime.run_folder import CONFIG_FILE, METRICS_FILE, TEST_METRICS_FILE

    run_dir = Path(run_dir)
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) if (run_dir / CONFIG_FILE).is_file() else {}
    except yaml.YAMLError:
        config = {}
    config = config if isinstance(config, dict) else {}
    dataset = _dataset_name(config or {})
    results = {}
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        records = []
        for line in metrics_path.read_text().splitlines():
            try:  # a line cut by a crash is skipped: the card must never stop an evaluation
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        records = [r for r in records if isinstance(r, dict)]
        best = next((r.get("best_epoch") for r in reversed(records) if r.get("best_epoch") is not None), None)
        for record in records:
            if record.get("epoch") == best and record.get("val"):
                split = ((config or {}).get("eval") or {}).get("split") or "val"
                results[split] = {"split": split, "dataset": dataset, "epoch": best, "rows": _rows(record["val"])}
    try:
        tested = json.loads((run_dir / TEST_METRICS_FILE).read_text()) if (run_dir / TEST_METRICS_FILE).is_file() else None
    except json.JSONDecodeError:
        tested = None
    if isinstance(tested, dict):
        results["test"] = {"split": "test", "dataset": dataset, "rows": _rows(tested)}
    for path in sorted(run_dir.glob("*/results.json")):
        try:
            evaluated = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for entry in _evaluation_entries(evaluated):
            label = f"{entry['split']} ({path.parent.name}/)" if entry["split"] in results else entry["split"]
            results[label] = entry
    return {"config": config or {}, "results": results}


def _evaluation_entries(evaluated) -> list[dict]:
    """The per-checkpoint rows of an eval_3rtpr.py results.json as record entries (dataset, split, rows)."""
    if not isinstance(evaluated, dict):
        return []
    dataset, split = evaluated.get("dataset"), evaluated.get("split", "test")
    entries = []
    for checkpoint in evaluated.get("checkpoints") or []:
        rows = _rows(checkpoint.get("rows") or checkpoint.get("metrics") or {})
        if rows:
            entries.append({"split": split, "dataset": dataset, "rows": rows})
    if not entries and _rows(evaluated.get("rows") or evaluated.get("metrics") or {}):
        entries.append({"split": split, "dataset": dataset, "rows": _rows(evaluated.get("rows") or evaluated["metrics"])})
    return entries[:1]


def main(argv: list[str] | None = None) -> int:
    """Save (--save-to) or push (--push-to-hub) a run's selected checkpoint with its generated card."""
    parser = argparse.ArgumentParser(prog="python -m trpr.modeling.card", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a training run folder (config.yaml, best/ or last/)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--save-to", type=Path, metavar="DIR", help="write the pair + README.md model card here")
    target.add_argument("--push-to-hub", metavar="REPO_ID", help="create/update this Hub model repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    args = parser.parse_args(argv)
    from .pair import ReciprocalPair
    from trpr.runtime.run_folder import selected_checkpoint

    chosen = selected_checkpoint(args.run_dir)
    if chosen is None:
        print(f"{parser.prog}: error: {args.run_dir}: no best/ or last/ (not a run folder)", file=sys.stderr)
        return 2
    pair = ReciprocalPair.from_pretrained(chosen)
    pair.run_record = read_run_record(args.run_dir)
    if args.save_to is not None:
        pair.save_pretrained(args.save_to)
        print(f"saved {chosen} with its model card to {args.save_to}")
    else:
        print(pair.push_to_hub(args.push_to_hub, private=args.private))
    return 0


if __name__ == "__main__":
    sys.exit(main())
