"""Loading a benchmark pickles nothing (issue: dill PicklingError on MonthDayNano on a GPU image).

Root cause (docs/decisions.md, "Benchmarks are built without dill"): `datasets` fingerprints a Dataset by
pickling its state with dill; dill pickles a module BY VALUE when the module's file lies outside
sys.prefix and outside any `site-packages` folder (`pip install --target DIR` + PYTHONPATH), and the
`pyarrow` namespace then drags in `pyarrow.MonthDayNano`, a class dill cannot pickle.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from trpr import data
from trpr.data.tokenizer import get_tokenizer
from tests.data.test_benchmarks import write_fixture

ROOT = Path(__file__).resolve().parents[2]


def _forbid_hashing(monkeypatch):
    """Every way `datasets` computes a fingerprint by pickling now raises."""
    import datasets.arrow_dataset
    import datasets.fingerprint

    def refuse(*args, **kwargs):
        raise AssertionError("datasets hashed (pickled) an object for a fingerprint")

    monkeypatch.setattr(datasets.fingerprint.Hasher, "hash", classmethod(refuse))
    monkeypatch.setattr(datasets.fingerprint, "generate_fingerprint", refuse)
    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", refuse)
    monkeypatch.setattr(datasets.arrow_dataset, "update_fingerprint", refuse)


def test_loading_and_reading_splits_hashes_nothing(tmp_path, monkeypatch):
    write_fixture(tmp_path, "cuhk-pedes")
    _forbid_hashing(monkeypatch)
    splits = data.load_benchmark("cuhk-pedes", root=tmp_path, noise_rate=0.5, seed=1,
                                 noise_out=tmp_path / "noise.npy")
    train = splits["train"]
    assert len(train) == 12 and train[3]["image"].size == (4, 8)
    tokenizer = get_tokenizer()
    views = data.TrainViews(train, tokenizer, (16, 8), output="uint8")
    assert views[(0, 2)]["pixel_values"].shape == (2, 3, 16, 8)
    assert data.EvalImages(splits["val_gallery"], (16, 8))[1]["pixel_values"].shape == (3, 16, 8)
    assert len(data.EvalTexts(splits["val_queries"], tokenizer)) == 8
    check = data.verify_images(train, cache_dir=tmp_path / "cache", name="cuhk-pedes/train", progress=False)
    kept = data.keep_rows(train, check.keep[::2])
    assert kept["index"][:] == list(range(6)) and kept["caption"][:] == train["caption"][::2]


def test_fingerprints_are_content_hashes(tmp_path):
    write_fixture(tmp_path, "rstpreid")
    first = data.load_benchmark("rstpreid", root=tmp_path)
    again = data.load_benchmark("rstpreid", root=tmp_path)
    noisy = data.load_benchmark("rstpreid", root=tmp_path, noise_rate=0.5, seed=0)
    assert first["train"]._fingerprint == again["train"]._fingerprint  # same content, same key
    assert first["train"]._fingerprint != noisy["train"]._fingerprint   # captions differ
    assert len({split._fingerprint for split in first.values()}) == len(first)


TRAINER_LIKE_PROCESS = """
import sys
sys.path.insert(0, {root!r})
# the trainer's imports, in the trainer's order (train_3rtpr.py), then an Accelerator
import numpy, torch, torch.distributed
from torch.utils.data import DataLoader
import transformers
from accelerate import Accelerator
from trpr import configs, data, kernels, modeling
from trpr.data.tokenizer import get_tokenizer
accelerator = Accelerator(cpu=True)

# the GPU image's trigger: pyarrow imported from a folder that is neither under sys.prefix nor a
# site-packages folder (pip install --target DIR + PYTHONPATH); dill then pickles the module by value
import dill._dill
is_builtin = dill._dill._is_builtin_module
dill._dill._is_builtin_module = lambda module: (False if module.__name__.split(".")[0] == "pyarrow"
                                                else is_builtin(module))
import datasets
try:
    datasets.Dataset.from_dict({{"a": [1, 2]}})
    print("trigger: none")
except Exception as error:  # the crash of the issue
    print("trigger:", type(error).__name__, "MonthDayNano" in str(error))

splits = data.load_benchmark("cuhk-pedes", root={data_root!r})
views = data.TrainViews(splits["train"], get_tokenizer(), (32, 16))
print("loaded", len(splits["train"]), tuple(views[(0, 1)]["pixel_values"].shape))
"""


def test_fresh_process_with_the_gpu_image_trigger(tmp_path):
    write_fixture(tmp_path, "cuhk-pedes")
    script = TRAINER_LIKE_PROCESS.format(root=str(ROOT), data_root=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # the simulated environment reproduces the GPU image's PicklingError for a plain Dataset.from_dict ...
    assert "trigger: PicklingError True" in lines, result.stdout + result.stderr[-2000:]
    # ... and the benchmark still loads
    assert "loaded 12 (2, 3, 32, 16)" in lines


def test_columns_follow_an_indices_mapping(tmp_path):
    from trpr.data.arrow_splits import column_values
    from trpr.data.torch_datasets import image_sources

    write_fixture(tmp_path, "cuhk-pedes")
    train = data.load_benchmark("cuhk-pedes", root=tmp_path)["train"]
    picked = train.select([5, 2, 9])  # a datasets indices mapping over the same table
    assert picked._indices is not None
    sources = image_sources(train)
    assert image_sources(picked) == [sources[5], sources[2], sources[9]]
    assert column_values(picked, "caption") == [train["caption"][i] for i in (5, 2, 9)]
    kept = data.keep_rows(picked, [2, 0])
    assert kept["caption"][:] == [train["caption"][9], train["caption"][5]] and kept["index"][:] == [0, 1]
    with pytest.raises(ValueError, match=r"rows must be 1-D positions in \[0, 3\)"):
        data.keep_rows(picked, [3])
