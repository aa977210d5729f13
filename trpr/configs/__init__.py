"""Training configs: YAML recipes on top of ``trpr/configs/defaults.yaml``, with dotted CLI overrides.

A recipe is a nested mapping (sections ``data``, ``model``, ``loss``, ``alr``, ``optim``, ``train``,
``eval``, ``logging``). It may name ``base:`` files (a path or a list of paths, relative to the recipe, or shipped recipe names)
that are applied first, in order. Every key must exist in ``defaults.yaml`` and have the type of its
default (an int is accepted where a float is expected); :data:`EXTRA_TYPES` lists the keys that accept
more than one type. Errors name the file (or ``command line``), the dotted key and the problem.

    config = load_config("synth-pedes", ["--train.epochs", "2", "--alr.mu=mean"])   # or a path to a YAML file
    config["train"]["epochs"]  # -> 2
    RunConfig.from_dict(config).train.epochs  # -> 2: the typed, frozen sections the engine reads (sections.py)
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .sections import RunConfig  # noqa: F401 - typed sections of a validated config (configs.RunConfig)

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"

# keys whose value may take several types: (types...) with type(None) for null
EXTRA_TYPES = {
    "data.root": (str, type(None)),
    "data.noise_file": (str, type(None)),
    "data.noise_rate": (float, type(None)),  # null in a recipe: "give it on the command line" (require_noise_rate)
    "model.backbone": (str, dict),
    "model.head_seeds": (list, type(None)),
    "alr.mu": (str, float),
    "eval.split": (str, type(None)),
    "train.compile": (str, bool),
}
# train.compile values (false means "off"); their meaning: trpr/engine/compilation.py
COMPILE_MODES = ("auto", "regional", "full", "off")
# alr.views: what the ALR pass's forwards see (engine.alr_pass): eval (the test transform, the project) |
# reference (each sample's training-augmented views, each model on the other model's view)
ALR_VIEWS = ("eval", "reference")
# list-valued keys whose length may differ from the default's (the others are fixed: [H, W], betas, ...)
VARIABLE_LENGTH = {"logging.trackers"}
KNOWN_DATASETS = ("cuhk-pedes", "icfg-pedes", "rstpreid", "synth-pedes", "synth-pedes-tiny",
                  "synth-pedes-small", "synth-pedes-full", "folder")


class ConfigError(ValueError):
    """A bad recipe file or command-line override (unknown key, wrong type, bad value)."""


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines, the
    last of them a caret under the offending text)."""
    problem = getattr(error, "problem", None)
    if not problem:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{context + ': ' if context else ''}{problem}{where}"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(error)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def default_config() -> dict:
    """The nested default config (a fresh copy)."""
    return _read_yaml(DEFAULTS_FILE)


def _type_name(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_value(key: str, value: Any, default: Any, source: str) -> Any:
    """Return ``value`` converted to the default's type, or raise ConfigError naming source and key."""
    allowed = EXTRA_TYPES.get(key, (type(default),))
    if float in allowed and str not in allowed and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or isinstance(default, bool):
        ok = isinstance(value, bool) and bool in allowed
    elif float in allowed and isinstance(value, int):
        return float(value)
    else:
        ok = isinstance(value, allowed)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {_type_name(allowed)}, got {value!r} "
                          f"({type(value).__name__})")
    if isinstance(default, list) and key in VARIABLE_LENGTH:
        return [_check_value(f"{key}[{i}]", item, default[0], source) for i, item in enumerate(value)]
    if isinstance(default, list) and default:
        if len(value) != len(default):
            raise ConfigError(f"{source}: {key} must have {len(default)} entries like {default}, got {value!r}")
        return [_check_value(f"{key}[{i}]", item, default[i], source) for i, item in enumerate(value)]
    if isinstance(default, list):
        return list(value)
    return value


def _merge(config: dict, update: dict, defaults: dict, source: str, prefix: str = "") -> None:
    """Merge ``update`` into ``config`` in place, checking every key against ``defaults``."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ConfigError(f"{source}: unknown key {dotted!r} (known here: {known})")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted} is a section, got {value!r}")
            _merge(config[key], value, defaults[key], source, dotted + ".")
        else:
            config[key] = _check_value(dotted, value, defaults[key], source)


def recipe_names() -> list[str]:
    """The recipes shipped in this package (``cuhk-pedes``, ``synth-pedes``, ...), without ``defaults``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "defaults")


def resolve_recipe(name_or_path: str | Path, relative_to: Optional[Path] = None) -> Path:
    """The recipe file meant by ``name_or_path``: an existing file (relative to ``relative_to`` when given,
    else to the working directory), or the name of a shipped recipe (``cuhk-pedes`` or ``cuhk-pedes.yaml``).

    A file wins over a shipped recipe of the same name. Raises ConfigError naming both places looked in.
    """
    path = Path(name_or_path)
    candidate = relative_to / path if relative_to is not None else path
    if candidate.is_file():
        return candidate
    if len(path.parts) == 1:
        shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml")
        if shipped.is_file() and shipped.stem != "defaults":
            return shipped
    raise ConfigError(f"config file {candidate} does not exist and {str(name_or_path)!r} is not a shipped recipe "
                      f"(shipped: {', '.join(recipe_names())})")


def _apply_file(config: dict, path: Path, defaults: dict, seen: tuple) -> None:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path}: base chain loops back to itself")
    recipe = _read_yaml(path)
    bases = recipe.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) and base.strip() for base in bases):
        raise ConfigError(f"config file {path}: base must be a recipe name or path, or a list of them, got {bases!r}")
    for base in bases:
        _apply_file(config, resolve_recipe(base, relative_to=path.parent), defaults, seen + (path,))
    _merge(config, recipe, defaults, f"config file {path}")


def parse_overrides(arguments: Iterable[str]) -> dict:
    """``["--train.epochs", "2", "--alr.mu=mean"]`` -> ``{"train": {"epochs": 2}, "alr": {"mu": "mean"}}``.

    Values are parsed with ``yaml.safe_load`` (so ``2`` is an int, ``null`` is None, ``[1, 2]`` a list).
    """
    arguments = list(arguments)
    nested: dict = {}
    position = 0
    while position < len(arguments):
        flag = arguments[position]
        if not flag.startswith("--") or len(flag) == 2:
            raise ConfigError(f"command line: expected --section.key VALUE, got {flag!r}")
        if "=" in flag:
            dotted, text = flag[2:].split("=", 1)
            position += 1
        else:
            if position + 1 >= len(arguments):
                raise ConfigError(f"command line: {flag} needs a value")
            dotted, text = flag[2:], arguments[position + 1]
            position += 2
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"command line: value of --{dotted} is not valid YAML: {yaml_problem(error)}") from None
        *sections, leaf = dotted.replace("-", "_").split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"command line: --{dotted} conflicts with an earlier override")
        target[leaf] = value
    return nested


# numeric ranges: dotted key -> (lower bound, whether the bound itself is allowed); every value must also be
# finite (YAML reads .inf and 1e400 as infinity)
NUMERIC_RANGES = {
    "seed": (0, True),
    "data.num_workers": (0, True),
    "model.fused_dim": (0, False),
    "loss.lambda_sdm": (0, True), "loss.lambda_trl": (0, True),
    "loss.logit_scale": (0, False), "loss.tau": (0, False), "loss.margin": (0, True),
    "alr.sharpness": (0, False), "alr.start_epoch": (0, True),
    "optim.backbone_lr": (0, True), "optim.head_warmup_epochs": (0, True), "optim.head_lr": (0, False), "optim.weight_decay": (0, True),
    "optim.bias_lr_factor": (0, False), "optim.eps": (0, False),
    "optim.warmup_epochs": (0, True), "optim.warmup_factor": (0, True),
    "train.log_every": (1, True),
    "eval.batch_size": (1, True),
}


def _lookup(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def check_ranges(config: dict, fail) -> None:
    """`fail(message)` for the first value outside its range in NUMERIC_RANGES, a non-finite number, Adam
    betas outside [0, 1), or image sizes the backbone cannot cut into patches / widths its heads cannot split."""
    import math

    for key, (bound, inclusive) in NUMERIC_RANGES.items():
        value = _lookup(config, key)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{key} must be a finite number, got {value}")
        if value < bound or (value == bound and not inclusive):
            relation = ">=" if inclusive else ">"
            fail(f"{key} must be {relation} {bound}, got {value}")
    for index, beta in enumerate(config["optim"]["betas"]):
        if not 0.0 <= beta < 1.0:
            fail(f"optim.betas[{index}] must lie in [0, 1), got {beta}")


def backbone_geometry(backbone) -> Optional[dict]:
    """{"patch_size", "vision": (width, heads), "text": (width, heads)} of a config's model.backbone where it
    can be known without loading weights: a mapping (configs.clip_configs.small_clip_config), a local folder with a
    config.json, or a Hub name ending in patch<N> (patch size only). None otherwise."""
    import json
    import re

    if isinstance(backbone, dict):  # read from the mapping over small_clip_config's defaults, before building it
        from .clip_configs import small_clip_config

        defaults = small_clip_config().to_dict()
        clip = {}
        for tower in ("vision", "text"):
            settings = dict(defaults[f"{tower}_config"])
            for field in ("hidden_size", "num_attention_heads", "patch_size"):
                for key in (field, f"{tower}_{field}"):  # a bare field sets both towers, a prefixed one wins
                    if key in backbone:
                        settings[field] = backbone[key]
            clip[f"{tower}_config"] = settings
    elif Path(backbone).is_dir() and (Path(backbone) / "config.json").is_file():
        try:
            clip = json.loads((Path(backbone) / "config.json").read_text())
        except (OSError, ValueError):
            return None
    else:
        match = re.search(r"patch(\d+)", str(backbone))
        return {"patch_size": int(match.group(1))} if match else None
    vision, text = clip.get("vision_config") or {}, clip.get("text_config") or {}
    geometry = {"patch_size": vision.get("patch_size")}
    for tower, settings in (("vision", vision), ("text", text)):
        if "hidden_size" in settings and "num_attention_heads" in settings:
            geometry[tower] = (settings["hidden_size"], settings["num_attention_heads"])
    return geometry


def validate(config: dict, source: str = "config") -> None:
    """Cross-field checks that a type check cannot do; raises ConfigError."""
    from trpr.data.images import IMAGE_POLICIES
    from trpr.data.noise import check_noise_rate
    from .choices import (IMAGE_TOKEN_MODES, MU_FLOOR_RULES, SELECTION_RULES, MixtureSettings, selection_rows,
                          validate_mu_rule)

    def fail(message):
        raise ConfigError(f"{source}: {message}")

    if config["data"]["dataset"].lower() not in KNOWN_DATASETS:
        fail(f"data.dataset {config['data']['dataset']!r} is not one of {', '.join(KNOWN_DATASETS)}")
    if config["data"]["dataset"].lower() == "folder" and not config["data"]["root"]:
        fail("data.dataset folder (a custom dataset) needs data.root: the folder holding annotations.csv or "
             "annotations.jsonl and the images")
    try:  # the one rule for noise rates, shared with data.load_benchmark
        check_noise_rate(config["data"]["noise_rate"], name="data.noise_rate")
    except ValueError as error:
        fail(str(error))
    if min(config["data"]["image_size"]) <= 0:
        fail(f"data.image_size must be positive, got {config['data']['image_size']}")
    check_ranges(config, fail)
    geometry = backbone_geometry(config["model"]["backbone"]) or {}
    patch = geometry.get("patch_size")
    if isinstance(patch, int) and patch <= 0:
        fail(f"model.backbone: the patch size must be > 0, got {patch}")
    if isinstance(patch, int) and patch > 0 and any(side % patch for side in config["data"]["image_size"]):
        fail(f"data.image_size {config['data']['image_size']} must be divisible by the backbone's patch size {patch}")
    for tower in ("vision", "text"):
        width, heads = geometry.get(tower, (None, None))
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            fail(f"model.backbone: the {tower} width (hidden_size) {width} is not divisible by its "
                 f"{heads} attention heads")
    if isinstance(config["model"]["backbone"], dict):
        from .clip_configs import small_clip_config  # builds a transformers CLIPConfig (lazy: transformers)
        try:
            small_clip_config(**config["model"]["backbone"])
        except Exception as error:  # noqa: BLE001 - transformers' validators raise their own error types
            message = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
            fail(f"model.backbone mapping is not a valid modeling.small_clip_config: {message}")
    if not 0.0 <= config["model"]["select_ratio"] <= 1.0:
        fail(f"model.select_ratio must lie in [0, 1], got {config['model']['select_ratio']}")
    if config["model"]["image_tokens"] not in IMAGE_TOKEN_MODES:
        fail(f"model.image_tokens must be topk, all or reference, got {config['model']['image_tokens']!r}")
    if config["loss"]["trl_temperature"] not in ("tau", "reference"):
        fail(f"loss.trl_temperature must be tau or reference, got {config['loss']['trl_temperature']!r}")
    if config["loss"]["lambda_sdm"] <= 0 and config["loss"]["lambda_trl"] <= 0:
        fail("loss.lambda_sdm and loss.lambda_trl are both 0: nothing to train")
    seeds = config["model"]["head_seeds"]
    if seeds is not None and (len(seeds) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        fail(f"model.head_seeds must be null (derived from seed) or two integers [A, B], got {seeds!r}")
    if config["alr"]["models"] not in (1, 2):
        fail(f"alr.models must be 1 or 2, got {config['alr']['models']}")
    try:
        MixtureSettings.from_config(config["alr"]).check()
    except ValueError as error:
        fail(f"alr: {error}")
    if config["alr"]["selection"] not in SELECTION_RULES:
        fail(f"alr.selection must be project or reference, got {config['alr']['selection']!r}")
    if config["alr"]["selection"] == "reference" and config["alr"]["drop_noisy"]:
        fail("alr.selection reference sets the keep flags itself (c = 2, and c = 1 on a coin flip): "
             "alr.drop_noisy must be false, got true")
    if config["alr"]["score"] not in ("fused", "global"):
        fail(f"alr.score must be fused or global, got {config['alr']['score']!r}")
    if config["alr"]["views"] not in ALR_VIEWS:
        fail(f"alr.views must be eval or reference, got {config['alr']['views']!r}")
    if config["alr"]["mu_floor"] not in MU_FLOOR_RULES:
        fail(f"alr.mu_floor must be project or reference, got {config['alr']['mu_floor']!r}")
    try:
        validate_mu_rule(config["alr"]["mu"])
    except ValueError as error:
        fail(f"alr.mu: {error}")
    if config["data"]["image_policy"] not in IMAGE_POLICIES:
        fail(f"data.image_policy must be one of {', '.join(IMAGE_POLICIES)}, got {config['data']['image_policy']!r}")
    if config["train"]["epochs"] < 1:
        fail(f"train.epochs must be >= 1, got {config['train']['epochs']}")
    if config["train"]["batch_size"] < 2:
        fail(f"train.batch_size must be >= 2 (the losses contrast the samples of a batch), "
             f"got {config['train']['batch_size']}")
    if config["train"]["compile"] is not False and config["train"]["compile"] not in COMPILE_MODES:
        fail(f"train.compile must be auto, regional, full or false, got {config['train']['compile']!r}")
    if config["optim"]["head_warmup_epochs"] >= config["train"]["epochs"]:
        fail(f"optim.head_warmup_epochs must be < train.epochs ({config['train']['epochs']}), "
             f"got {config['optim']['head_warmup_epochs']}")
    if config["eval"]["every"] < 1:
        fail(f"eval.every must be >= 1, got {config['eval']['every']}")
    try:
        selection_rows(config["eval"]["select_row"])
    except ValueError as error:
        fail(f"eval.select_row must be a row like 'A+B/GE+FS' or a rule like 'max(A+B/GE, A+B/FS)': {error}")


def apply_gmm_preset(config: dict, source: str = "config") -> None:
    """alr.gmm_preset other than none: write its (gmm_max_iter, gmm_tol, gmm_reg_covar) for the config's
    dataset and noise rate into the alr section (the preset wins over the three keys; the resolved
    config.yaml records the values used). ConfigError naming an unknown preset."""
    from .choices import mixture_preset

    alr = config["alr"]
    try:
        values = mixture_preset(alr["gmm_preset"], config["data"]["dataset"], config["data"]["noise_rate"])
    except ValueError:
        raise ConfigError(f"{source}: alr.gmm_preset must be none, reference or rde, got {alr['gmm_preset']!r}") from None
    if values is not None:
        alr["gmm_max_iter"], alr["gmm_tol"], alr["gmm_reg_covar"] = values


def require_noise_rate(config: dict, source: str) -> None:
    """A recipe that leaves ``data.noise_rate`` null (the per-dataset noisy recipes, ``<dataset>-noisy.yaml``)
    takes the rate from the command line; ConfigError unless it was given and is > 0 (the rate also picks the
    mixture band of ``alr.gmm_preset rde``, so a ``data.noise_file`` does not stand in for it)."""
    rate = config["data"]["noise_rate"]
    if rate is None or rate == 0:  # a negative or >= 1 rate: validate's range check
        raise ConfigError(f"{source}: data.noise_rate must be given and > 0 for this noisy-correspondence recipe "
                          f"(got {rate!r}): add --data.noise_rate R with 0 < R < 1, e.g. 0.2, 0.5 or 0.8")


def load_config(path: Optional[str | Path], overrides: Iterable[str] = ()) -> dict:
    """Defaults, then the recipe at ``path`` (and its bases), then the command-line overrides.

    path: a recipe YAML path, the name of a shipped recipe (``cuhk-pedes``: :func:`recipe_names`) or None
    (defaults only); overrides: ``--section.key VALUE`` tokens.
    Returns the resolved nested dict; raises ConfigError on any unknown key, wrong type or bad value.
    """
    defaults = default_config()
    config = copy.deepcopy(defaults)
    source = "defaults"
    if path is not None:
        _apply_file(config, resolve_recipe(path), defaults, ())
        source = f"config file {path}"
    rate_required = config["data"]["noise_rate"] is None  # the recipe leaves the noise rate to the command line
    update = parse_overrides(overrides)
    if update:
        _merge(config, update, defaults, "command line")
        source += " + command line"
    if rate_required or config["data"]["noise_rate"] is None:
        require_noise_rate(config, source)
    apply_gmm_preset(config, source)
    validate(config, source)
    return config


def save_config(config: dict, path: str | Path) -> None:
    """Write the resolved config as YAML (key order kept)."""
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))


def describe_keys(width: int = 100) -> str:
    """Every config section with its keys and defaults, from defaults.yaml (for `train_3rtpr.py --help`),
    one section per line (wrapped between keys)."""
    def show(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()

    lines = []
    for section, values in default_config().items():
        if not isinstance(values, dict):
            lines.append(f"  {section}: {show(values)}")
            continue
        line = f"  {section}:"
        for key, value in values.items():
            item = f" {key}={show(value)}"
            if len(line) + len(item) > width:
                lines.append(line)
                line = "     "
            line += item
        lines.append(line)
    return "\n".join(lines)
