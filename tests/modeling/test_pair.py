"""ReciprocalPair construction and checkpoints; scoring_features identity (dot product == sum of cosines)."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from trpr.modeling import ReciprocalPair, TRPRModel, scoring_features, small_clip_config
from tests.caption_ids import captions


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip")
    CLIPModel(small_clip_config()).save_pretrained(directory)
    return ReciprocalPair.from_clip(directory, head_seeds=(0, 1), image_size=(64, 32), fused_dim=32)


def test_pair_shares_backbone_weights_and_differs_in_heads(pair):
    backbone_a = {n: t for n, t in pair.a.state_dict().items() if n.startswith("clip.")}
    backbone_b = {n: t for n, t in pair.b.state_dict().items() if n.startswith("clip.")}
    assert backbone_a.keys() == backbone_b.keys()
    assert all(torch.equal(backbone_a[n], backbone_b[n]) for n in backbone_a)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(pair.a.parameters(), pair.b.parameters()))
    assert not torch.equal(pair.a.text_head.token_fc1.weight, pair.b.text_head.token_fc1.weight)
    same_seeds = ReciprocalPair.from_clip(small_clip_config(), head_seeds=(0, 1), image_size=(64, 32), fused_dim=32)
    assert torch.equal(same_seeds.b.image_head.global_proj.weight, pair.b.image_head.global_proj.weight)
    assert not pair.a.clip.vision_model.embeddings.patch_embedding.weight.requires_grad
    assert not pair.b.clip.vision_model.embeddings.patch_embedding.weight.requires_grad


def test_pair_save_load_round_trip_is_bit_identical(pair, tmp_path):
    pixels, (ids, mask) = torch.randn(2, 3, 64, 32), captions([5, 11])
    pair.train()
    pair.encode_image(pixels), pair.encode_text(ids, mask)  # move BN running stats
    pair.eval()
    pair.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "pair.json").read_text())["members"] == ["model_a", "model_b"]
    assert (tmp_path / "model_a" / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()
    loaded = ReciprocalPair.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.a, TRPRModel) and isinstance(loaded.b, TRPRModel)
    with torch.no_grad():
        for got, expected in ((loaded.encode_image(pixels), pair.encode_image(pixels)),
                              (loaded.encode_text(ids, mask), pair.encode_text(ids, mask))):
            for (g1, f1), (g2, f2) in zip(got, expected):
                assert torch.equal(g1, g2) and torch.equal(f1, f2)


def test_pair_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pair.json"):
        ReciprocalPair.from_pretrained(tmp_path)
    (tmp_path / "pair.json").write_text('{"model_type": "3rtpr-pair", "members": ["only_one"]}')
    with pytest.raises(ValueError, match="pair.json"):
        ReciprocalPair.from_pretrained(tmp_path)


def cosine(x, y):
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T


@pytest.mark.parametrize("score", ["GE", "FS", "GE+FS"])
def test_scoring_features_dot_product_is_the_sum_of_cosines(score):
    torch.manual_seed(0)
    queries = [(torch.randn(5, 8) * 3, torch.randn(5, 16)), (torch.randn(5, 8), torch.randn(5, 16) * 0.1)]
    gallery = [(torch.randn(7, 8), torch.randn(7, 16) * 5), (torch.randn(7, 8) * 2, torch.randn(7, 16))]

    def one_model(query, item):
        parts = {"GE": cosine(query[0], item[0]), "FS": cosine(query[1], item[1])}
        return parts["GE"] + parts["FS"] if score == "GE+FS" else parts[score]

    single = scoring_features([queries[0]], score) @ scoring_features([gallery[0]], score).T
    torch.testing.assert_close(single, one_model(queries[0], gallery[0]))
    bare_tuple = scoring_features(queries[0], score) @ scoring_features(gallery[0], score).T
    torch.testing.assert_close(bare_tuple, single)
    ensemble = scoring_features(queries, score) @ scoring_features(gallery, score).T
    torch.testing.assert_close(ensemble, one_model(queries[0], gallery[0]) + one_model(queries[1], gallery[1]))
    width = {"GE": 8, "FS": 16, "GE+FS": 24}[score]
    assert scoring_features(queries, score).shape == (5, 2 * width)


def test_scoring_features_rejects_unknown_score():
    with pytest.raises(ValueError, match="GE"):
        scoring_features([(torch.randn(2, 4), torch.randn(2, 4))], "cosine")
