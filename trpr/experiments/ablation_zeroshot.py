"""The ablation's zero-shot row: the pretrained backbone every run starts from, evaluated once without any
fine-tuning (global embeddings, row A/GE; the fused heads would be untrained, so their rows are not kept) on
the test split of the recipe's dataset -> <runs_dir>/zeroshot_test_metrics.json.

A backbone given as a mapping (a random-init architecture: the from-scratch mode, --random-init) has nothing
pretrained to evaluate; `ensure_zeroshot` then writes nothing and says why.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ZEROSHOT_FILE = "zeroshot_test_metrics.json"
ZEROSHOT_ROW = "A/GE"
REPO = Path(__file__).resolve().parents[2]  # the checkout (trpr/configs), as ablation_sweep.REPO


def zeroshot_config(args) -> dict:
    """The config of the sweep's clean-condition runs (recipe, --set overrides, --backbone), data.root
    defaulting to the sweep's dataset cache ($TRPR_CACHE, else <runs_dir>/cache, as the runs use)."""
    from trpr import configs
    from trpr.experiments.ablation_plan import config_for

    overrides = [part for item in args.extra for part in (f"--{item.split('=', 1)[0].strip()}",
                                                           item.split("=", 1)[1].strip())]
    if args.backbone is not None:
        overrides += ["--model.backbone", args.backbone]
    condition = "clean" if "clean" in args.conditions else args.conditions[0]
    config = configs.load_config(configs.resolve_recipe(config_for(condition, args), relative_to=REPO), overrides)
    config["data"]["root"] = config["data"]["root"] or os.environ.get("TRPR_CACHE") or str(
        Path(args.runs_dir).resolve() / "cache")
    return config


def evaluate_zeroshot(config: dict) -> dict:
    """{"backbone", "dataset", "A/GE": {"R1","R5","R10","mAP","mINP"}} of the config's backbone, untouched, on
    the test split of its dataset (engine.build_pair: the trainer's model, before any step)."""
    import torch

    from trpr import data
    from trpr.data.tokenizer import get_tokenizer
    from trpr.engine import build_pair
    from trpr.evaluation import evaluate_pair

    torch.manual_seed(0)  # the untrained heads (not reported) are the only random part
    pair = build_pair(config).eval()
    if torch.cuda.is_available():
        pair = pair.to("cuda")
    splits = data.load_benchmark(config["data"]["dataset"], root=config["data"]["root"])
    metrics = evaluate_pair(pair, splits["test_gallery"], splits["test_queries"], tokenizer=get_tokenizer(),
                            image_size=tuple(config["data"]["image_size"]), batch_size=config["eval"]["batch_size"])
    return {"backbone": str(config["model"]["backbone"]), "dataset": config["data"]["dataset"],
            ZEROSHOT_ROW: metrics[ZEROSHOT_ROW]}


def ensure_zeroshot(args) -> Path | None:
    """Evaluates the zero-shot row once (skipped when <runs_dir>/zeroshot_test_metrics.json exists); returns
    the file, or None with a printed reason when the backbone is a random-init mapping or cannot be loaded
    (a missing folder, a hub name while offline)."""
    target = Path(args.runs_dir).resolve() / ZEROSHOT_FILE
    if target.is_file():
        return target
    config = zeroshot_config(args)
    backbone = config["model"]["backbone"]
    if not isinstance(backbone, str):
        print("ablation: no zero-shot row: model.backbone is a random-init architecture, nothing pretrained")
        return None
    try:
        result = evaluate_zeroshot(config)
    except (OSError, ValueError) as error:
        print(f"ablation: no zero-shot row: model.backbone {backbone!r} could not be loaded ({error})")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, target)
    return target


def read_zeroshot(runs_dir) -> dict | None:
    """The zero-shot record of a sweep (`evaluate_zeroshot`'s), or None when it was not evaluated."""
    path = Path(runs_dir).resolve() / ZEROSHOT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
