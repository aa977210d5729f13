"""trpr.configs is a leaf (docs/design.md): loading and validating every recipe never imports trpr.modeling."""
import json
import subprocess
import sys
import textwrap

from trpr.configs import CONFIG_DIR

PROBE = textwrap.dedent("""
    import json, sys
    from trpr.configs import CONFIG_DIR, load_config, validate
    from trpr.configs.choices import selection_rows

    loaded = []
    for recipe in sorted(CONFIG_DIR.glob("*.yaml")):
        if recipe.name == "defaults.yaml":
            continue
        config = load_config(recipe, ["--data.noise_rate", "0.5", "--alr.gmm_preset", "rde"])
        validate(config, str(recipe))
        selection_rows(config["eval"]["select_row"])
        loaded.append(recipe.stem)
    config = load_config(None)
    config["model"]["backbone"] = {"hidden_size": 96, "vision_patch_size": 16}  # the small_clip_config check
    validate(config, "mapping backbone")
    print(json.dumps({"loaded": loaded, "trpr": sorted(m for m in sys.modules if m.startswith("trpr"))}))
""")


def test_loading_and_validating_every_recipe_imports_no_modeling():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    recipes = {p.stem for p in CONFIG_DIR.glob("*.yaml")} - {"defaults"}
    assert set(report["loaded"]) == recipes and len(recipes) >= 10
    assert not [name for name in report["trpr"] if name == "trpr.modeling" or name.startswith("trpr.modeling.")]
    assert "trpr.configs.choices" in report["trpr"] and "trpr.configs.clip_configs" in report["trpr"]
