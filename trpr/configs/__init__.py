"""Training configs: YAML recipes on top of ``trpr/configs/defaults.yaml``, with dotted CLI overrides.

A recipe is a nested mapping (sections ``data``, ``model``, ``loss``, ``alr``, ``optim``, ``train``,
``eval``, ``logging``). It may name ``base:`` files (a path or a list of paths, relative to the recipe, or shipped recipe names)
that are applied first, in order. Every key must exist in ``defaults.yaml`` and have the type of its
default (an int is accepted where a float is expected); :data:`EXTRA_TYPES` lists the keys that accept
more than one type. Errors name the file (or ``command line``), the dotted key and the problem.

    config = load_config("synth-pedes", ["--train.epochs", "2", "--alr.mu=mean"])   # or a path to a YAML file
    config["train"]["epochs"]  # -> 2
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = CONFIG_DIR / "defaults.yaml"

# keys whose value may take several types: (types...) with type(None) for null
EXTRA_TYPES = {
    "data.root": (str, type(None)),
    "data.noise_file": (str, type(None)),
    "model.backbone": (str, dict),
    "model.head_seeds": (list, type(None)),
    "alr.mu": (str, float),
    "eval.split": (str, type(None)),
    "train.compile": (str, bool),
}
# train.compile values (false means "off"); their meaning: trpr/engine/compilation.py
COMPILE_MODES = ("auto", "regional", "full", "off")
# list-valued keys whose length may differ from the default's (the others are fixed: [H, W], betas, ...)
VARIABLE_LENGTH = {"logging.trackers"}
KNOWN_DATASETS = ("cuhk-pedes", "icfg-pedes", "rstpreid", "synth-pedes", "synth-pedes-tiny",
                  "synth-pedes-small", "synth-pedes-full", "folder")


class ConfigError(ValueError):
    """A bad recipe file or command-line override (unknown key, wrong type, bad value)."""


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
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
    for base in [bases] if isinstance(bases, str) else bases:
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
            raise ConfigError(f"command line: value of --{dotted} is not valid YAML: {error}") from None
        *sections, leaf = dotted.replace("-", "_").split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"command line: --{dotted} conflicts with an earlier override")
        target[leaf] = value
    return nested


def validate(config: dict, source: str = "config") -> None:
    """Cross-field checks that a type check cannot do; raises ConfigError."""
    from trpr.data.images import IMAGE_POLICIES
    from trpr.data.noise import check_noise_rate
    from trpr.modeling.alr import MixtureSettings, validate_mu_rule
    from trpr.modeling.pair import parse_row_key

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
    if isinstance(config["model"]["backbone"], dict):
        from trpr.modeling import small_clip_config
        try:
            small_clip_config(**config["model"]["backbone"])
        except (TypeError, ValueError) as error:
            fail(f"model.backbone mapping is not a valid modeling.small_clip_config: {error}")
    if not 0.0 <= config["model"]["select_ratio"] <= 1.0:
        fail(f"model.select_ratio must lie in [0, 1], got {config['model']['select_ratio']}")
    if config["model"]["image_tokens"] not in ("topk", "all"):
        fail(f"model.image_tokens must be topk or all, got {config['model']['image_tokens']!r}")
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
    if config["eval"]["every"] < 1:
        fail(f"eval.every must be >= 1, got {config['eval']['every']}")
    try:
        parse_row_key(config["eval"]["select_row"])
    except ValueError as error:
        fail(f"eval.select_row must be a row like 'A+B/GE+FS': {error}")


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
    update = parse_overrides(overrides)
    if update:
        _merge(config, update, defaults, "command line")
        source += " + command line"
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
