"""Training configs (trpr/configs/__init__.py): recipes, bases, dotted overrides and early errors."""
from pathlib import Path

import pytest
import yaml

from trpr.configs import CONFIG_DIR, ConfigError, RunConfig, load_config, parse_overrides, save_config

RECIPES = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name not in ("defaults.yaml", "noisy-correspondence.yaml"))


NOISY = ("cuhk-pedes-noisy", "icfg-pedes-noisy", "rstpreid-noisy")  # their noise rate comes from the command line


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_resolves(recipe):
    noisy = recipe.stem in NOISY
    config = load_config(recipe, ["--data.noise_rate", "0.5"] if noisy else [])
    dataset = config["data"]["dataset"]  # in the name, except the proxy recipes (fine-tuning on synth-pedes)
    assert dataset in recipe.stem or (recipe.stem.startswith("proxy-") and dataset == "synth-pedes")
    assert noisy == (recipe.stem.endswith("-noisy") and recipe.stem != "proxy-noisy")  # a new one: add it to NOISY
    if noisy:
        assert config["loss"] == {**config["loss"], "lambda_sdm": 0.0, "lambda_trl": 1.0}
        # RDE's standard permutation file is picked up by the data layer: nothing may override it
        assert config["data"]["noise_file"] is None
        folder = {"cuhk-pedes": "CUHK-PEDES", "icfg-pedes": "ICFG-PEDES", "rstpreid": "RSTPReid"}[config["data"]["dataset"]]
        header = recipe.read_text().split("base:")[0]
        assert f"noiseindex/{folder}_<rate>.npy" in header and "GENERATED" in header
        assert config["alr"]["gmm_preset"] == "rde"


# The nine <dataset>-noise<rate>.yaml recipes that <dataset>-noisy.yaml + --data.noise_rate replaced (issue 19), as
# they resolved: the clean dataset recipe, then TRL only (noisy-correspondence.yaml), the rate, and RDE's mixture
# settings written out per file (alr.gmm_preset none). Nothing else differed between them.
OLD_NOISE_RECIPES = {
    # (dataset, rate): (gmm_max_iter, gmm_tol, gmm_reg_covar)
    ("cuhk-pedes", 0.2): (10, 1.0e-2, 5.0e-4),
    ("cuhk-pedes", 0.5): (100, 1.0e-4, 1.0e-6),
    ("cuhk-pedes", 0.8): (100, 1.0e-4, 1.0e-6),
    ("icfg-pedes", 0.2): (10, 1.0e-2, 5.0e-4),
    ("icfg-pedes", 0.5): (100, 1.0e-4, 1.0e-6),
    ("icfg-pedes", 0.8): (100, 1.0e-4, 1.0e-6),
    ("rstpreid", 0.2): (100, 1.0e-4, 1.0e-6),
    ("rstpreid", 0.5): (100, 1.0e-4, 1.0e-6),
    ("rstpreid", 0.8): (100, 1.0e-4, 1.0e-6),
}


@pytest.mark.parametrize("dataset, rate", sorted(OLD_NOISE_RECIPES), ids=lambda v: str(v))
def test_noisy_recipe_with_a_rate_resolves_to_the_old_per_rate_recipe(dataset, rate, tmp_path):
    max_iter, tol, reg_covar = OLD_NOISE_RECIPES[dataset, rate]
    # (+ the choices of 2026-12-07, docs/method.md §10.7: hard selection scored on the global similarity, TRL trained
    # at temperature = margin)
    old = load_config(dataset, ["--loss.lambda_sdm", "0.0", "--loss.lambda_trl", "1.0", "--data.noise_rate", str(rate),
                                "--alr.selection", "reference", "--alr.score", "global",
                                "--loss.trl_temperature", "reference",
                                "--alr.gmm_max_iter", str(max_iter), "--alr.gmm_tol", str(tol),
                                "--alr.gmm_reg_covar", str(reg_covar)])
    assert old["alr"]["gmm_preset"] == "none"
    new = load_config(f"{dataset}-noisy", ["--data.noise_rate", str(rate)])
    assert new["alr"]["gmm_preset"] == "rde"  # the only difference: the rule that produced the three values
    assert {**new, "alr": {**new["alr"], "gmm_preset": "none"}} == old
    alr = new["alr"]
    assert (alr["gmm_max_iter"], alr["gmm_tol"], alr["gmm_reg_covar"]) == (max_iter, tol, reg_covar)
    assert type(alr["gmm_max_iter"]) is int and type(alr["gmm_tol"]) is float and type(alr["gmm_reg_covar"]) is float
    # the run's config.yaml (resolved values + the preset) loads back to the same config
    save_config(new, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == new


@pytest.mark.parametrize("recipe", NOISY)
@pytest.mark.parametrize("overrides", [[], ["--data.noise_rate", "0"], ["--data.noise_rate", "0.0"],
                                       ["--data.noise_rate", "null"],
                                       ["--data.noise_rate", "0", "--data.noise_file", "x.npy"]])
def test_noisy_recipe_without_a_rate_stops_naming_the_key(recipe, overrides):
    with pytest.raises(ConfigError) as error:
        load_config(recipe, overrides)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"config file {recipe}")
    assert "data.noise_rate must be given and > 0" in message and "--data.noise_rate R" in message


def test_a_null_noise_rate_is_only_a_recipe_placeholder():
    with pytest.raises(ConfigError, match="data.noise_rate must be given"):
        load_config("cuhk-pedes", ["--data.noise_rate", "null"])
    with pytest.raises(ConfigError, match="data.noise_rate must lie in"):
        load_config("cuhk-pedes-noisy", ["--data.noise_rate", "1.0"])
    assert load_config("cuhk-pedes", ["--data.noise_rate", "0"])["data"]["noise_rate"] == 0.0  # clean recipes: 0 is fine
    # proxy-noisy keeps its fixed mixture settings and its own noise handling (the ablation's twin runs pass
    # data.noise_rate 0.0 with a data.noise_file)
    proxy = load_config("proxy-noisy", ["--data.noise_rate", "0.0", "--data.noise_file", "x.npy"])
    assert proxy["alr"]["gmm_preset"] == "none" and proxy["data"]["noise_rate"] == 0.0


def test_paper_recipe_values():
    config = load_config(CONFIG_DIR / "cuhk-pedes.yaml")
    assert config["model"]["backbone"] == "openai/clip-vit-base-patch16"
    assert config["data"]["image_size"] == [384, 128]
    assert (config["train"]["batch_size"], config["train"]["epochs"]) == (128, 60)
    assert (config["model"]["select_ratio"], config["model"]["fused_dim"]) == (0.2, 2048)
    assert load_config(CONFIG_DIR / "icfg-pedes.yaml")["eval"]["split"] is None


def test_overrides_are_typed_and_nested():
    config = load_config(CONFIG_DIR / "cuhk-pedes.yaml",
                         ["--alr.sharpness", "3", "--train.epochs=2", "--alr.mu", "q0.1",
                          "--model.backbone", "{hidden_size: 32}", "--data.root", "/tmp/x",
                          "--alr.drop_noisy", "true", "--optim.head_lr", "1e-4"])
    assert config["optim"]["head_lr"] == 1e-4
    assert config["alr"]["sharpness"] == 3.0 and isinstance(config["alr"]["sharpness"], float)
    assert config["train"]["epochs"] == 2
    assert config["alr"]["mu"] == "q0.1"
    assert config["model"]["backbone"] == {"hidden_size": 32}
    assert config["data"]["root"] == "/tmp/x"
    assert config["alr"]["drop_noisy"] is True
    assert parse_overrides(["--eval.split", "null"]) == {"eval": {"split": None}}


@pytest.mark.parametrize("overrides, message", [
    (["--train.epoch", "2"], "unknown key 'train.epoch'"),
    (["--nosection.x", "1"], "unknown key 'nosection'"),
    (["--train.epochs", "two"], "train.epochs must be int, got 'two'"),
    (["--train.epochs", "2.5"], "train.epochs must be int"),
    (["--alr.enabled", "1"], "alr.enabled must be bool"),
    (["--data.image_size", "[384]"], "data.image_size must have 2 entries"),
    (["--data.dataset", "market1501"], "data.dataset 'market1501' is not one of"),
    (["--alr.mu", "median"], "alr.mu"),
    (["--eval.select_row", "C/GE"], "eval.select_row"),
    (["--eval.select_row", "max(A/GE)"], "eval.select_row must be a row like .* or a rule like"),
    (["--eval.select_row", "max(A/GE, C/FS)"], "eval.select_row must be a row"),
    (["--model.head_seeds", "[1]"], "model.head_seeds must be null .* or two integers"),
    (["--model.head_seeds", "[1, 2.5]"], "model.head_seeds must be null"),
    (["--model.head_seeds", "7"], "model.head_seeds must be list or null"),
    (["--alr.gmm_max_iter", "0"], "gmm_max_iter >= 1"),
    (["--loss.trl_temperature", "margin"], "loss.trl_temperature must be tau or reference, got 'margin'"),
    (["--alr.gmm_preset", "irra"], "alr.gmm_preset must be none, reference or rde, got 'irra'"),
    (["--alr.score", "both"], "alr.score must be fused or global, got 'both'"),
    (["--alr.views", "train"], "alr.views must be eval or reference, got 'train'"),
    (["--optim.head_warmup_epochs", "-1"], "optim.head_warmup_epochs must be >= 0, got -1"),
    (["--optim.head_warmup_epochs", "60"], "optim.head_warmup_epochs must be < train.epochs .*, got 60"),
    (["--optim.backbone_lr", "-1e-5"], "optim.backbone_lr must be >= 0"),
    (["--alr.mu_floor", "none"], "alr.mu_floor must be project or reference, got 'none'"),
    (["--alr.selection", "coin"], "alr.selection must be project or reference, got 'coin'"),
    (["--alr.selection", "reference", "--alr.drop_noisy", "true"], "alr.drop_noisy must be false, got true"),
    (["--alr.gmm_tol", "-1e-3"], "gmm_tol > 0"),
    (["--alr.gmm_reg_covar", "-1.0"], "gmm_reg_covar >= 0"),
    (["--train.epochs"], "needs a value"),
    (["epochs", "2"], "expected --section.key VALUE"),
])
def test_bad_overrides_fail_early_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as error:
        load_config(CONFIG_DIR / "cuhk-pedes.yaml", overrides)
    if overrides[0].startswith("--"):
        assert "command line" in str(error.value) or "config file" in str(error.value)


def test_bad_recipe_file_names_file_and_key(tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(CONFIG_DIR / "cuhk-pedes.yaml"), "optim": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'optim\.lr'"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


@pytest.mark.parametrize("recipe, preset, expected", [
    ("cuhk-pedes", "reference", (10, 1e-2, 5e-4)),
    ("rstpreid", "reference", (100, 1e-4, 1e-6)),
    ("cuhk-pedes --data.noise_rate 0.5", "reference", (10, 1e-2, 5e-4)),   # the reference's rule ignores the rate
    ("cuhk-pedes --data.noise_rate 0.2", "rde", (10, 1e-2, 5e-4)),
    ("cuhk-pedes --data.noise_rate 0.5", "rde", (100, 1e-4, 1e-6)),
    ("rstpreid --data.noise_rate 0.2", "rde", (100, 1e-4, 1e-6)),
    ("cuhk-pedes", "none", (100, 1e-3, 5e-4)),               # the defaults: unchanged
])
def test_gmm_preset_sets_the_three_mixture_keys(recipe, preset, expected):
    recipe, *overrides = recipe.split()
    config = load_config(recipe, [*overrides, "--alr.gmm_preset", preset])
    alr = config["alr"]
    assert (alr["gmm_max_iter"], alr["gmm_tol"], alr["gmm_reg_covar"]) == expected
    assert load_config(recipe, overrides)["alr"]["gmm_preset"] == "none"


def test_select_row_max_rule_picks_the_best_of_its_rows():
    from trpr.engine import selection_score
    from trpr.modeling.pair import selection_rows

    config = load_config(None, ["--eval.select_row", "max(A+B/GE, A+B/FS)"])
    assert selection_rows(config["eval"]["select_row"]) == ("A+B/GE", "A+B/FS")
    metrics = {"A+B/GE": {"R1": 61.5}, "A+B/FS": {"R1": 63.25}, "A+B/GE+FS": {"R1": 64.0}}
    evaluation = RunConfig.from_dict(config).eval
    assert selection_score(metrics, evaluation) == 63.25  # max(GE, FS), not GE+FS
    assert selection_score({**metrics, "A+B/GE": {"R1": 70.0}}, evaluation) == 70.0
    assert selection_score(metrics, RunConfig.from_dict(load_config(None)).eval) == 64.0  # the default row: unchanged


def test_search_and_card_take_the_first_row_of_a_max_rule():
    from types import SimpleNamespace

    from trpr.evaluation.search import choose_search_row
    from trpr.modeling.card import card_data

    checkpoint = SimpleNamespace(run_config={"eval": {"select_row": "max(A/GE, A/FS)"}}, path="run/best")
    row, why = choose_search_row(None, checkpoint)
    assert row == "A/GE" and "first row of the run's selection rule" in why
    record = {"config": {"eval": {"select_row": "max(A/GE, A/FS)"}},
              "results": {"test": {"dataset": "cuhk-pedes", "rows": {"A/GE": {"R1": 50.0}}}}}
    assert "A/GE" in card_data(record).eval_results[0].metric_name


def test_typed_sections_mirror_defaults_yaml():
    """configs.RunConfig: one frozen dataclass field per defaults.yaml key (a key added to one and not the
    other fails here), lists as tuples, values unchanged."""
    import dataclasses

    from trpr.configs import default_config
    from trpr.configs.sections import SECTIONS, RunConfig

    defaults = default_config()
    assert set(defaults) == set(SECTIONS) | {"seed"}
    for name, section in SECTIONS.items():
        assert [f.name for f in dataclasses.fields(section)] == list(defaults[name]), name
    config = load_config(CONFIG_DIR / "synth-pedes.yaml", ["--train.epochs", "3", "--alr.start_epoch", "2"])
    run = RunConfig.from_dict(config)
    assert run.seed == config["seed"] and run.train.epochs == 3 and run.data.image_size == tuple(config["data"]["image_size"])
    assert run.optim.betas == tuple(config["optim"]["betas"]) and run.logging.trackers == tuple(config["logging"]["trackers"])
    assert [run.alr.active(epoch) for epoch in range(4)] == [False, False, True, True]
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.epochs = 4
    config["train"]["unknown"] = 1
    with pytest.raises(ValueError, match=r"section train: keys \['unknown'\]"):
        RunConfig.from_dict(config)
