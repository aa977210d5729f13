"""trpr.experiments.proxy_attention (scripts/proxy_attention.py): person masks that belong to the stored pictures, patch fractions, scores."""
import json

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from trpr.experiments import proxy_attention
from trpr.modeling import small_clip_config


def test_patch_person_fraction_on_the_model_grid():
    mask = np.zeros((128, 48), dtype=bool)
    mask[:, :24] = True  # left half is person
    fraction = proxy_attention.patch_person_fraction(mask, (64, 32), 8)
    assert fraction.shape == (8 * 4,)
    grid = fraction.reshape(8, 4)
    assert np.allclose(grid[:, :2], 1.0) and np.allclose(grid[:, 2:], 0.0)


def test_attention_scores_against_chance():
    person = np.array([[1.0, 1.0, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0]])
    on_person = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    scores = proxy_attention.attention_scores(on_person, person, k=1)
    assert scores["attention_on_person"] == pytest.approx(1.0) and scores["topk_precision"] == 1.0
    assert scores["person_patch_fraction"] == pytest.approx(3 / 8)
    uniform = proxy_attention.attention_scores(np.full((2, 4), 0.25), person, k=2)
    assert uniform["attention_on_person"] == pytest.approx(3 / 8)


def test_pictures_are_the_stored_ones_and_the_figure_is_written(tmp_path):
    pictures = proxy_attention.test_pictures("tiny", 6, tmp_path / "data")  # raises if a picture differs
    assert len(pictures) == 6 and all(p["mask"].shape == (128, 48) and p["mask"].any() for p in pictures)
    torch.manual_seed(0)
    CLIPModel(small_clip_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                projection_dim=32, vision_patch_size=8, vision_image_size=32)).save_pretrained(
        tmp_path / "clip")
    out = tmp_path / "attention.png"
    assert proxy_attention.main(["--backbone", str(tmp_path / "clip"), "--random-init", "--preset", "tiny",
                                 "--root", str(tmp_path / "data"), "--pictures", "6", "--shown", "3",
                                 "--image-size", "32", "16", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["scores"]) == {"random init", "proxy (pretrained)"} and out.stat().st_size > 0
    for scores in result["scores"].values():
        assert 0 <= scores["attention_on_person"] <= 1 and scores["k"] == 1  # floor(8 patches * 0.2)
