"""trpr/engine/run.py: the pair a run builds. The run `seed` decides the fused-head initialisation of both
models unless model.head_seeds names the seeds; run folders written with head_seeds [0, 1] resume."""
import torch
import yaml

from trpr import configs
from trpr import engine

TINY_BACKBONE = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, projection_dim: 32}"


def tiny_config(*overrides):
    return configs.load_config(None, ["--model.backbone", TINY_BACKBONE, "--model.fused_dim", "32",
                                      "--data.image_size", "[32, 16]", *overrides])


def head_weights(pair):
    return [torch.cat([p.detach().flatten() for n, p in model.named_parameters() if not n.startswith("clip.")])
            for model in pair.models]


def test_seed_changes_both_models_heads():
    assert tiny_config()["model"]["head_seeds"] is None
    assert engine.run.head_seeds(tiny_config()) == (0, 1)
    assert engine.run.head_seeds(tiny_config("--seed", "4")) == (8, 9)
    seed0, seed1 = (head_weights(engine.build_pair(tiny_config("--seed", str(seed)))) for seed in (0, 1))
    assert not torch.equal(seed0[0], seed0[1])  # A and B differ within a run
    assert not torch.equal(seed0[0], seed1[0]) and not torch.equal(seed0[1], seed1[1])  # and across seeds
    again = head_weights(engine.build_pair(tiny_config("--seed", "1")))
    assert all(torch.equal(a, b) for a, b in zip(again, seed1))  # reproducible


def test_explicit_head_seeds_are_honoured():
    config = tiny_config("--seed", "5", "--model.head_seeds", "[0, 1]")
    assert engine.run.head_seeds(config) == (0, 1)
    explicit, default_seed0 = head_weights(engine.build_pair(config)), head_weights(engine.build_pair(tiny_config()))
    assert all(torch.equal(a, b) for a, b in zip(explicit, default_seed0))


def test_old_run_folder_config_still_resumes(tmp_path):
    """A config.yaml written before head_seeds could be null and before the alr.gmm_* keys existed."""
    old = configs.default_config()
    old["model"]["head_seeds"] = [0, 1]
    for key in ("gmm_max_iter", "gmm_tol", "gmm_reg_covar"):
        del old["alr"][key]
    old["seed"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    config, run_dir = engine.resolve_run([], resume_dir=tmp_path)
    assert run_dir == tmp_path and config["model"]["head_seeds"] == [0, 1]
    assert engine.run.head_seeds(config) == (0, 1)  # the run's own heads, not those of seed 2
    assert (config["alr"]["gmm_max_iter"], config["alr"]["gmm_tol"], config["alr"]["gmm_reg_covar"]) == (100, 1e-3, 5e-4)
