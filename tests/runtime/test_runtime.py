"""The shared runtime floor (trpr/runtime/): atomic writes, the cache root, the sharded encoder."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from trpr.runtime import atomic, cache
from trpr.runtime.encoding import encode, eval_mode
from trpr.runtime.sharding import gather_shares, shard_indices


def test_atomic_path_replaces_only_a_complete_write(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["report.json"]
    atomic.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and sorted(os.listdir(tmp_path)) == ["report.json"]


def test_nested_atomic_paths_rename_the_inner_file_first(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (renamed.append(os.path.basename(dst)),
                                                                 real_replace(src, dst)))
    with atomic.atomic_path(tmp_path / "features.bin") as outer, atomic.atomic_path(tmp_path / "meta.json") as inner:
        assert outer.name.startswith(".features.bin.") and outer.name.endswith(".tmp") and outer != inner
        outer.write_bytes(b"x")
        inner.write_text("{}")
    assert renamed == ["meta.json", "features.bin"]


def test_replace_folder_keeps_a_complete_copy_written_meanwhile(tmp_path):
    out = tmp_path / "data"
    first = atomic.temporary_folder(out, "info.json", "data")
    (first / "info.json").write_text("first")
    atomic.replace_folder(first, out, keep_complete="info.json")
    second = atomic.temporary_folder(out, "info.json", "data")
    (second / "info.json").write_text("second")
    atomic.replace_folder(second, out, keep_complete="info.json")  # another process finished first: kept
    assert (out / "info.json").read_text() == "first" and not second.exists()
    third = atomic.temporary_folder(out, "info.json", "data")
    (third / "info.json").write_text("third")
    atomic.replace_folder(third, out)  # overwrite
    assert (out / "info.json").read_text() == "third" and sorted(os.listdir(tmp_path)) == ["data"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(FileExistsError):
        atomic.temporary_folder(tmp_path / "other", "info.json", "data")


def test_one_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path))
    assert cache.cache_root() == tmp_path
    assert cache.tokenizer_cache_dir() == tmp_path / "clip_bpe"
    assert cache.image_checks_dir() == tmp_path / "image_checks"
    assert cache.search_features_dir() == tmp_path / "search-features"
    monkeypatch.delenv("TRPR_CACHE")
    assert cache.cache_root() == cache.Path.home() / ".cache" / "3rtpr"


class TinyEncoder(torch.nn.Module):
    """encode_image / encode_text -> (global [B, 3], fused [B, 5]) like TRPRModel."""
    embed_dim, output_dim = 3, 5

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.image = torch.nn.Linear(4, 8)
        self.text = torch.nn.Embedding(10, 8)

    def encode_image(self, pixels):
        out = self.image(pixels.flatten(1)[:, :4])
        return out[:, :3], out[:, 3:]

    def encode_text(self, ids, mask):
        out = (self.text(ids) * mask[..., None]).sum(1)
        return out[:, :3], out[:, 3:]


class Images(torch.utils.data.Dataset):
    def __init__(self, n):
        self.pixels = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i]}


class Texts:
    def __init__(self, n):
        generator = torch.Generator().manual_seed(2)
        self.input_ids = torch.randint(1, 10, (n, 6), generator=generator)
        self.attention_mask = (torch.arange(6) < torch.randint(2, 7, (n, 1), generator=generator)).long()

    def __len__(self):
        return len(self.input_ids)


def test_encode_returns_the_pieces_asked_for_in_dataset_order():
    models = [TinyEncoder(0), TinyEncoder(1)]
    images, texts = Images(11), Texts(7)
    with torch.no_grad():
        expected = [m.encode_image(images.pixels) for m in models]
        expected_text = [m.encode_text(texts.input_ids, texts.attention_mask) for m in models]
    outputs = encode(models, images, "image", batch_size=4)
    for (global_emb, fused), (g, f) in zip(outputs, expected):
        assert torch.allclose(global_emb, g, atol=1e-6) and torch.allclose(fused, f, atol=1e-6)
    (fused,), _ = encode(models, texts, "text", pieces=("fused",), normalize=True, dtype=torch.float16, batch_size=3)
    assert fused.dtype == torch.float16 and fused.shape == (7, 5)
    assert torch.allclose(fused.float(), F.normalize(expected_text[0][1], dim=-1), atol=1e-3)
    trimmed = encode(models[:1], texts, "text", pieces=("global",), batch_size=3,
                     prepare_texts=lambda ids, mask: (ids * mask, mask))
    assert torch.allclose(trimmed[0][0], expected_text[0][0], atol=1e-6)
    with pytest.raises(ValueError, match="pieces"):
        encode(models, images, "image", pieces=("cls",))


def test_shards_cover_every_item_and_gather_in_rank_order():
    class Fake:
        num_processes = 3

        def __init__(self, rank):
            self.process_index = rank

    shares = [shard_indices(7, Fake(rank)) for rank in range(3)]
    assert [i for indices, _ in shares for i in indices] == [0, 1, 2, 3, 4, 5, 6, 6, 6]

    class Gatherer(Fake):
        device = torch.device("cpu")

        def gather(self, tensor):
            return torch.cat([torch.tensor(indices) for indices, _ in shares])

    assert gather_shares(torch.tensor([0, 1, 2]), 7, Gatherer(0)).tolist() == list(range(7))
    assert gather_shares(torch.tensor([5]), 1, None).tolist() == [5]


def test_eval_mode_restores_the_mode():
    model = TinyEncoder(0).train()
    with eval_mode(model):
        assert not model.training
    assert model.training
