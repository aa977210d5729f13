"""Million-image galleries (issue 22): streamed, resumable, memory-mapped shards (1 or 2 processes give the
same index), the FAISS candidates + exact re-scoring path, and its index kept in step with the gallery."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval_3rtpr
from tests.evaluation.test_folder_gallery import CAPTION, TARGET, gallery_setup  # noqa: F401  (a fixture)
from trpr import modeling
from trpr.evaluation import ann_index, folder_gallery, gallery_shards, resolve_checkpoint
from trpr.evaluation.checkpoints import load_pair
from trpr.modeling.pair import parse_row_key

ROOT = Path(__file__).resolve().parents[2]


def _clustered_features(count: int, seed: int = 0) -> list:
    """Per model (global [N, 16], fused [N, 24]): points around 12 centres, so an IVF index has structure."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, 80)).astype(np.float32)
    rows = centres[rng.integers(0, 12, count)] + 0.6 * rng.normal(size=(count, 80)).astype(np.float32)
    rows = torch.from_numpy(rows)
    return [(rows[:, :16], rows[:, 16:40]), (rows[:, 40:56], rows[:, 56:80])]


def _query(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).normal(size=80).astype(np.float32)


@pytest.fixture()
def store(tmp_path):
    return gallery_shards.write_features_to_shards(_clustered_features(700), tmp_path / "shards", job="f1",
                                                   shard_size=128)


def _dense_exact(store, query, row, top):
    """The exact ranking the way search.py does it: modeling.scoring_features + a stable sort."""
    model_indices, score = parse_row_key(row)
    feats = store.features()
    raw = torch.from_numpy(query)
    cols = store.columns
    q_pairs = [(raw[slice(*cols[f"{m}.global"])][None], raw[slice(*cols[f"{m}.fused"])][None]) for m in "ab"]
    gallery = modeling.scoring_features([feats[i] for i in model_indices], score)
    q = modeling.scoring_features([q_pairs[i] for i in model_indices], score)[0]
    scores = gallery @ q
    order = torch.sort(scores, descending=True, stable=True).indices[:top]
    return order.numpy(), scores[order].numpy()


@pytest.mark.parametrize("row", ["A+B/GE+FS", "A/FS", "B/GE+FS"])
def test_ann_returns_the_exact_top_k_when_nprobe_covers_all_lists(store, tmp_path, row):
    params = ann_index.AnnParams(nlist=8, nprobe=8, candidates=store.count)
    searcher = ann_index.AnnSearcher.open(store, tmp_path / "shards", params, progress=False)
    assert ann_index.ivf_of(searcher.index).nlist == 8 and searcher.index.ntotal == 700
    for seed in range(5):
        query = _query(seed)
        rows, scores = searcher.search(query, row, 10)
        dense_rows, dense_scores = _dense_exact(store, query, row, 10)
        exact_rows, exact_scores = ann_index.exact_search(store, query, row, 10, chunk_rows=100)
        assert rows.tolist() == dense_rows.tolist() == exact_rows.tolist()
        np.testing.assert_allclose(scores, dense_scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(exact_scores, dense_scores, rtol=0, atol=1e-5)
    # float codes, every list scanned: the compact row (A+B/GE+FS) comes out exact even with candidates = top
    flat = ann_index.AnnSearcher.open(store, tmp_path / "flat", ann_index.AnnParams(nlist=8, nprobe=8, codec="Flat"),
                                      progress=False)
    rows, _ = flat.search(_query(9), "A+B/GE+FS", 10, candidates=10)
    assert rows.tolist() == _dense_exact(store, _query(9), "A+B/GE+FS", 10)[0].tolist()


def test_rescoring_uses_exact_scores_of_the_full_row(store, tmp_path):
    params = ann_index.AnnParams(nlist=16, nprobe=1, candidates=40)
    searcher = ann_index.AnnSearcher.open(store, tmp_path / "shards", params, progress=False)
    query = _query(3)
    rows, scores = searcher.search(query, "A+B/GE+FS", 10)
    assert len(rows) == 10 and np.all(np.diff(scores) <= 0)
    _, all_scores = _dense_exact(store, query, "A+B/GE+FS", store.count)
    by_row = dict(zip(_dense_exact(store, query, "A+B/GE+FS", store.count)[0].tolist(), all_scores.tolist()))
    np.testing.assert_allclose(scores, [by_row[r] for r in rows.tolist()], rtol=0, atol=1e-5)
    # another row is re-scored with its own pieces (one cosine: at most 1), not the candidates' row
    rows, scores = searcher.search(query, "B/FS", 5)
    by_row = dict(zip(*[a.tolist() for a in _dense_exact(store, query, "B/FS", store.count)]))
    np.testing.assert_allclose(scores, [by_row[r] for r in rows.tolist()], rtol=0, atol=1e-5)
    assert np.all(scores <= 1 + 1e-6)


def test_ann_index_is_saved_with_its_parameters_and_rebuilt_when_the_gallery_changes(tmp_path):
    ann_index._OPEN.clear()
    first = ann_index.searcher_for(_clustered_features(500), tmp_path / "g.ann", "id-1", 500, "ann", progress=False)
    meta = json.loads((tmp_path / "g.ann" / "ann.json").read_text())
    assert first.rebuilt and meta["fingerprint"] == "id-1" and meta["count"] == 500
    assert meta["params"]["nlist"] == ann_index.ivf_of(first.index).nlist and meta["params"]["nprobe"] == first.params.nprobe
    assert (tmp_path / "g.ann" / "ann.faiss").is_file()
    assert ann_index.searcher_for(None, tmp_path / "g.ann", "id-1", 500, "ann") is first  # one load per process
    ann_index._OPEN.clear()
    again = ann_index.searcher_for(None, tmp_path / "g.ann", "id-1", 500, "ann", progress=False)
    assert not again.rebuilt  # read back from disk
    changed = ann_index.searcher_for(_clustered_features(520, seed=1), tmp_path / "g.ann", "id-2", 520, "ann",
                                     progress=False)
    assert changed.rebuilt and changed.index.ntotal == 520 and changed.store.count == 520
    assert json.loads((tmp_path / "g.ann" / "ann.json").read_text())["fingerprint"] == "id-2"
    # auto: exact below the threshold, approximate above; exact never builds anything
    assert ann_index.searcher_for(None, tmp_path / "x", "id", 500, "auto", threshold=1000) is None
    assert ann_index.searcher_for(None, tmp_path / "x", "id", 500, "exact") is None and not (tmp_path / "x").exists()
    with pytest.raises(gallery_shards.ShardError, match=r"manifest.json: cannot be read"):
        gallery_shards.ShardStore(tmp_path / "nowhere")


def test_search_cli_ann_follows_the_folder(gallery_setup, tmp_path, capsys):  # noqa: F811
    ann_index._OPEN.clear()
    photos = tmp_path / "photos"
    shutil.copytree(gallery_setup["photos"], photos)
    argv = ["search", CAPTION, "--checkpoint", str(gallery_setup["pair_dir"]), "--gallery", str(photos),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--index", "ann"]
    assert eval_3rtpr.main(argv) == 0
    captured = capsys.readouterr()
    assert "approximate index" in captured.err and "built" in captured.err
    table = [line.split() for line in captured.out.splitlines() if line.strip()[:1].isdigit()]
    assert table[0][2] == TARGET
    (ann_dir,) = (tmp_path / "cache").glob("folder-*.ann")
    before = json.loads((ann_dir / "ann.json").read_text())
    exact = ["search", CAPTION, "--checkpoint", str(gallery_setup["pair_dir"]), "--gallery", str(photos),
             "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--index", "exact"]
    assert eval_3rtpr.main(exact) == 0
    exact_table = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[2] for r in exact_table] == [r[2] for r in table]  # a few images: every one is a candidate
    Image.open(photos / TARGET).save(photos / "new.png")
    assert eval_3rtpr.main(argv) == 0
    err = capsys.readouterr().err
    assert "approximate index" in err and "built" in err
    meta = json.loads((ann_dir / "ann.json").read_text())
    assert meta["fingerprint"] != before["fingerprint"] and meta["count"] == before["count"] + 1 == len(table) + 1


def _images(gallery_setup, count):
    sources = gallery_setup["sources"]
    return [sources[i % len(sources)] for i in range(count)]


def test_streaming_encode_resumes_after_an_interruption(gallery_setup, tmp_path, monkeypatch):  # noqa: F811
    pair = load_pair(resolve_checkpoint(str(gallery_setup["pair_dir"])))
    paths = _images(gallery_setup, 10)
    straight = gallery_shards.encode_to_shards(pair, paths, tmp_path / "straight", shard_size=3, progress=False)
    written = []
    real_write = gallery_shards._write_shard

    def write_then_die(path, array):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        written.append(path.name)
        real_write(path, array)

    monkeypatch.setattr(gallery_shards, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        gallery_shards.encode_to_shards(pair, paths, tmp_path / "resumed", shard_size=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("shard-*.npy")) == written == \
        ["shard-00000.npy", "shard-00001.npy"]
    with pytest.raises(gallery_shards.ShardError, match=r"resumed/manifest.json: the encode .* has not finished"):
        gallery_shards.ShardStore(tmp_path / "resumed")
    monkeypatch.setattr(gallery_shards, "_write_shard", lambda path, array: (written.append(path.name),
                                                                            real_write(path, array)))
    resumed = gallery_shards.encode_to_shards(pair, paths, tmp_path / "resumed", shard_size=3, progress=False)
    assert written == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy", "shard-00003.npy"]  # only the rest
    assert resumed.count == straight.count == 10 and resumed.dtype == np.float16
    for a, b in zip(resumed.shards, straight.shards):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(resumed.rows([9, 0, 4, 4]), straight.rows([9, 0, 4, 4]))
    # another job (other images) in the same folder starts over instead of mixing rows
    other = gallery_shards.encode_to_shards(pair, paths[:4], tmp_path / "resumed", shard_size=3, progress=False)
    assert other.count == 4 and len(list((tmp_path / "resumed").glob("shard-*.npy"))) == 2


def test_two_processes_build_the_same_folder_index_as_one(gallery_setup, tmp_path):  # noqa: F811
    photos = tmp_path / "photos"
    for i, source in enumerate(_images(gallery_setup, 9)):
        (photos / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("RGB").save(photos / f"d{i % 3}" / f"{i}.png")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["-m", "trpr.evaluation.gallery_shards", "--checkpoint", str(gallery_setup["pair_dir"]),
              "--gallery", str(photos), "--shard-size", "2"]
    one = subprocess.run([sys.executable, *common, "--cache-dir", str(tmp_path / "c1")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *common,
                          "--cache-dir", str(tmp_path / "c2")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "9 images" in two.stdout
    assert "process 1 of 1" in one.stderr and "process 1 of 2" in two.stderr and "process 2 of 2" in two.stderr
    checkpoint = resolve_checkpoint(str(gallery_setup["pair_dir"]))
    indexes = [folder_gallery.load_folder_index(folder_gallery.folder_cache_stem(checkpoint, photos, tmp_path / c), photos)
               for c in ("c1", "c2")]
    assert indexes[0] is not None and indexes[1] is not None
    assert indexes[0].files == indexes[1].files and len(indexes[0].files) == 9
    for (g1, f1), (g2, f2) in zip(indexes[0].features, indexes[1].features):
        assert torch.equal(g1, g2) and torch.equal(f1, f2)
    assert not list((tmp_path / "c2").glob("*.pending"))  # the streamed shards are removed once merged


def test_benchmark_gallery_keeps_the_real_rows_and_its_batched_exact_ranking_is_exact(tmp_path):
    from trpr.benchmarks import million_gallery

    features = _clustered_features(50)
    base = torch.cat([p for pair in features for p in pair], dim=1).numpy()
    columns = gallery_shards.piece_columns([(16, 24), (16, 24)])
    store = million_gallery.write_gallery(base, columns, 300, tmp_path / "g", shard_size=64)
    assert store.count == 300 and len(store.shards) == 5 and store.dtype == np.float16
    assert np.array_equal(store.rows(np.arange(50)), base.astype(np.float16).astype(np.float32))
    assert not np.allclose(store.rows(np.arange(50, 100)), store.rows(np.arange(50)), atol=1e-2)  # perturbed
    queries = np.stack([_query(s) for s in range(4)])
    batched = million_gallery.exact_rankings(store, queries, 10)
    for query, ranking in zip(queries, batched):
        assert ranking.tolist() == ann_index.exact_search(store, query, million_gallery.ROW, 10)[0].tolist()


def _photo_folder(gallery_setup, folder: Path, count: int) -> Path:
    for i, source in enumerate(_images(gallery_setup, count)):
        (folder / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("RGB").save(folder / f"d{i % 3}" / f"{i:02d}.png")
    return folder


def _fp32_reference(pair, folder: Path, files: list) -> list:
    """The features the version-1 index held: every file encoded in fp32 and kept in memory."""
    from trpr.runtime.encoding import encode, eval_mode

    with eval_mode(pair), torch.no_grad():
        images = folder_gallery.FolderImages([folder / f[0] for f in files], tuple(pair.a.image_size))
        return [(g.float(), f.float()) for g, f in encode([pair.a, pair.b], images, "image", batch_size=4)]


@pytest.mark.parametrize("row", ["A+B/GE+FS", "A/FS", "B/GE"])
def test_folder_search_from_fp16_shards_matches_the_fp32_in_memory_ranking(gallery_setup, tmp_path, monkeypatch, row):  # noqa: F811
    from trpr.data.tokenizer import get_tokenizer
    from trpr.evaluation import search

    pair = load_pair(resolve_checkpoint(str(gallery_setup["pair_dir"])))
    photos = _photo_folder(gallery_setup, tmp_path / "photos", 12)
    index, _ = folder_gallery.update_folder_index(pair, photos, tmp_path / "index", batch_size=4, progress=False)
    assert index.store.dtype == np.float16 and index.store.dir.parent.name == "index.shards"
    reference = search.GalleryIndex(image_outputs=_fp32_reference(pair, photos, index.files),
                                    pids=torch.full((12,), -1), image_ids=torch.arange(12),
                                    sources=[f[0] for f in index.files], root=photos)
    tokenizer = get_tokenizer()
    for query in (CAPTION, "a man in a blue jacket", "a woman with a red bag"):
        before = search.search_gallery(pair, reference, query, tokenizer=tokenizer, row=row, top=12)
        in_memory = search.search_gallery(pair, index.gallery_index(), query, tokenizer=tokenizer, row=row, top=12)
        monkeypatch.setattr(search, "EXACT_IN_MEMORY_MAX", 5)  # the same gallery streamed from the memory maps
        gallery = index.gallery_index()
        assert gallery.streamed()
        streamed = search.search_gallery(pair, gallery, query, tokenizer=tokenizer, row=row, top=12)
        assert gallery.image_outputs is None  # never read whole
        monkeypatch.setattr(search, "EXACT_IN_MEMORY_MAX", 50_000)
        exact_scores = {m["file"]: m["score"] for m in before}
        for ranking in (in_memory, streamed):
            assert [m["file"] for m in ranking] == [m["file"] for m in before] or \
                all(abs(exact_scores[m["file"]] - b["score"]) < 1e-2 for m, b in zip(ranking, before))  # fp16 near-ties
            np.testing.assert_allclose([m["score"] for m in ranking], [exact_scores[m["file"]] for m in ranking],
                                       rtol=0, atol=1e-2)
        assert [m["file"] for m in streamed] == [m["file"] for m in in_memory]
        np.testing.assert_allclose([m["score"] for m in streamed], [m["score"] for m in in_memory], rtol=0, atol=1e-5)


def test_folder_index_resumes_an_interrupted_encode_and_reencodes_changed_files(gallery_setup, tmp_path, monkeypatch):  # noqa: F811
    pair = load_pair(resolve_checkpoint(str(gallery_setup["pair_dir"])))
    photos = _photo_folder(gallery_setup, tmp_path / "photos", 9)
    straight, _ = folder_gallery.update_folder_index(pair, photos, tmp_path / "straight", batch_size=4, shard_size=2,
                                                     progress=False)
    stem = tmp_path / "index"
    written, real_write = [], gallery_shards._write_shard

    def write_then_die(path, array):
        if len(written) == 3:
            raise KeyboardInterrupt("simulated kill")
        written.append(path.name)
        real_write(path, array)

    monkeypatch.setattr(gallery_shards, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        folder_gallery.update_folder_index(pair, photos, stem, batch_size=4, shard_size=2, progress=False)
    pending = stem.with_name("index.pending")
    assert sorted(p.name for p in pending.glob("shard-*.npy")) == written  # finished shards kept
    assert folder_gallery.load_folder_index(stem, photos) is None  # nothing saved yet
    monkeypatch.setattr(gallery_shards, "_write_shard", lambda path, array: (written.append(path.name),
                                                                            real_write(path, array)))
    resumed, update = folder_gallery.update_folder_index(pair, photos, stem, batch_size=4, shard_size=2, progress=False)
    assert written == [f"shard-{n:05d}.npy" for n in range(5)] and update.encoded == 9  # only the rest encoded
    assert not pending.exists() and resumed.files == straight.files
    assert np.array_equal(resumed.store.rows(np.arange(9)), straight.store.rows(np.arange(9)))

    # interrupted again, then one of the files to encode is rewritten before the resume: its shard is not reused
    for i in range(9, 13):
        shutil.copy(photos / "d0" / "00.png", photos / "d1" / f"{i:02d}.png")
    written.clear()
    monkeypatch.setattr(gallery_shards, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):  # 4 new files, 2 per shard: both shards would fit; die after the first
        written.extend(["", ""])
        folder_gallery.update_folder_index(pair, photos, stem, batch_size=4, shard_size=2, progress=False)
    assert len(list(pending.glob("shard-*.npy"))) == 1
    changed = photos / "d1" / "09.png"
    Image.open(gallery_setup["sources"][20]).convert("RGB").save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    written.clear()
    monkeypatch.setattr(gallery_shards, "_write_shard", lambda path, array: (written.append(path.name),
                                                                            real_write(path, array)))
    updated, update = folder_gallery.update_folder_index(pair, photos, stem, batch_size=4, shard_size=2, progress=False)
    assert (update.reused, update.added, update.encoded) == (9, 4, 4)
    assert written[:2] == ["shard-00000.npy", "shard-00001.npy"]  # another job: the stale shard was not kept
    fresh, _ = folder_gallery.update_folder_index(pair, photos, tmp_path / "fresh", batch_size=4, progress=False)
    assert updated.files == fresh.files and len(updated.files) == 13
    np.testing.assert_allclose(updated.store.rows(np.arange(13)), fresh.store.rows(np.arange(13)), rtol=2e-3, atol=1e-4)

    # a changed image (same path, new bytes) is re-encoded; the rest keep their rows
    before = updated.store.rows(np.arange(13))
    target = photos / "d0" / "03.png"
    Image.open(gallery_setup["sources"][15]).convert("RGB").save(target)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    again, update = folder_gallery.update_folder_index(pair, photos, stem, batch_size=4, shard_size=2, progress=False)
    assert (update.changed, update.encoded, update.reused) == (1, 1, 12)
    row = [f[0] for f in again.files].index("d0/03.png")
    after = again.store.rows(np.arange(13))
    assert not np.allclose(after[row], before[row], atol=1e-3)
    assert np.array_equal(np.delete(after, row, 0), np.delete(before, row, 0))
    expected = _fp32_reference(pair, photos, [again.files[row]])
    np.testing.assert_allclose(after[row], torch.cat([p[0] for m in expected for p in m]).numpy(), rtol=2e-3, atol=1e-3)
    assert [p.name for p in (tmp_path / "index.shards").iterdir()] == [again.index_id]  # older generations dropped


def test_folder_search_uses_the_ann_index_above_the_threshold(gallery_setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    ann_index._OPEN.clear()
    photos = tmp_path / "photos"
    shutil.copytree(gallery_setup["photos"], photos)
    argv = ["search", CAPTION, "--checkpoint", str(gallery_setup["pair_dir"]), "--gallery", str(photos),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]  # --index auto
    assert eval_3rtpr.main(argv) == 0
    assert "approximate index" not in capsys.readouterr().err  # 8 images: exact
    monkeypatch.setattr(ann_index, "ANN_THRESHOLD", 5)
    assert eval_3rtpr.main(argv) == 0
    captured = capsys.readouterr()
    assert "approximate index" in captured.err and "built" in captured.err
    assert [line.split() for line in captured.out.splitlines() if line.strip()[:1].isdigit()][0][2] == TARGET
    (ann_dir,) = (tmp_path / "cache").glob("folder-*.ann")
    assert sorted(p.name for p in ann_dir.iterdir()) == ["ann.faiss", "ann.json"]  # re-scored from the index's shards
    index = folder_gallery.load_folder_index(ann_dir.with_name(ann_dir.name[:-4]), photos)
    assert json.loads((ann_dir / "ann.json").read_text())["fingerprint"] == index.index_id == index.store.job
    assert eval_3rtpr.main(argv + ["--index", "exact"]) == 0
    assert "approximate index" not in capsys.readouterr().err
