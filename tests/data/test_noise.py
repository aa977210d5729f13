"""Noisy correspondence: RDE's standard noise files, the one valid range of noise rates, bad .npy files."""
import logging

import numpy as np
import pytest

from trpr import configs
from trpr.data import load_benchmark
from trpr.data.noise import check_noise_rate, load_permutation, standard_noise_file
from tests.data.test_benchmarks import write_fixture


def test_standard_noise_file_names_match_rde():
    assert standard_noise_file("/r", "CUHK-PEDES", 0.2).as_posix() == "/r/noiseindex/CUHK-PEDES_0.2.npy"
    assert standard_noise_file("/r", "ICFG-PEDES", 0.5).name == "ICFG-PEDES_0.5.npy"
    assert standard_noise_file("/r", "RSTPReid", 0.8).name == "RSTPReid_0.8.npy"


@pytest.mark.parametrize("fmt, folder", [("cuhk-pedes", "CUHK-PEDES"), ("rstpreid", "RSTPReid")])
def test_standard_noise_file_is_used_when_present(tmp_path, caplog, fmt, folder):
    write_fixture(tmp_path, fmt)
    clean = load_benchmark(fmt, root=tmp_path)["train"]
    permutation = np.roll(np.arange(len(clean)), 3).astype(np.int64)  # unlike any seeded permutation
    (tmp_path / "noiseindex").mkdir()
    np.save(tmp_path / "noiseindex" / f"{folder}_0.2.npy", permutation)
    out = tmp_path / "run" / "noise_permutation.npy"
    with caplog.at_level(logging.INFO, logger="trpr.data.benchmarks"):
        noisy = load_benchmark(fmt, root=tmp_path, noise_rate=0.2, seed=5, noise_out=out)["train"]
    assert noisy["caption"][:] == [clean["caption"][j] for j in permutation]
    assert all(noisy["noisy"][:])
    assert f"using the standard noise file {tmp_path / 'noiseindex' / f'{folder}_0.2.npy'}" in caplog.text
    assert "GENERATING" not in caplog.text
    assert np.array_equal(np.load(out), permutation)  # the run folder keeps the permutation it used
    # another rate has no file: generated, with the loud warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trpr.data.benchmarks"):
        generated = load_benchmark(fmt, root=tmp_path, noise_rate=0.5, seed=5)["train"]
    assert generated["caption"][:] != noisy["caption"][:]
    assert any(record.levelno == logging.WARNING and "GENERATING a noise permutation" in record.getMessage()
               and "NOT comparable with published" in record.getMessage()
               and f"{folder}_0.5.npy" in record.getMessage() for record in caplog.records)


def test_explicit_noise_file_wins_over_the_standard_file(tmp_path):
    write_fixture(tmp_path, "cuhk-pedes")
    (tmp_path / "noiseindex").mkdir()
    np.save(tmp_path / "noiseindex" / "CUHK-PEDES_0.2.npy", np.roll(np.arange(12), 1).astype(np.int64))
    np.save(tmp_path / "mine.npy", np.arange(12, dtype=np.int64))
    train = load_benchmark("cuhk-pedes", root=tmp_path, noise_rate=0.2, noise_file=tmp_path / "mine.npy")["train"]
    assert not any(train["noisy"][:])


def test_synth_pedes_generates_without_the_published_numbers_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trpr.data.benchmarks"):
        train = load_benchmark("synth-pedes-tiny", root=tmp_path, noise_rate=0.5, seed=0)["train"]
    assert any(train["noisy"][:])
    assert "generated" in caplog.text and "GENERATING" not in caplog.text  # no published numbers exist


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1, float("nan"), "0.2", True])
def test_one_noise_rate_rule_for_loader_and_config(tmp_path, rate):
    write_fixture(tmp_path, "cuhk-pedes")
    with pytest.raises(ValueError, match=r"noise_rate must lie in \[0, 1\)"):
        check_noise_rate(rate)
    with pytest.raises(ValueError, match=r"noise_rate must lie in \[0, 1\)"):
        load_benchmark("cuhk-pedes", root=tmp_path, noise_rate=rate)
    if isinstance(rate, float):  # the config check applies the same rule (strings/bools fail its type check)
        config = configs.load_config(None)
        config["data"]["noise_rate"] = rate
        with pytest.raises(configs.ConfigError, match=r"data\.noise_rate must lie in \[0, 1\)"):
            configs.validate(config)
    assert check_noise_rate(0.0) == 0.0 and check_noise_rate(0.8) == 0.8


@pytest.mark.parametrize("content, message", [
    (b"this is not numpy", r"not a \.npy file \(it starts with b'this i'"),
    (b"", "empty"),
    (b"PK\x03\x04rest-of-a-zip", r"a zip archive \(\.npz\?\)"),
])
def test_garbage_noise_files_say_what_they_are(tmp_path, content, message):
    path = tmp_path / "noise.npy"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_permutation(path, 12)
    assert "pickled" not in str(info.value) and str(path) in str(info.value)


def test_object_and_truncated_noise_files(tmp_path):
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        load_permutation(objects, 2)
    good = tmp_path / "good.npy"
    np.save(good, np.arange(1000, dtype=np.int64))
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated.npy: damaged") as info:
        load_permutation(truncated, 1000)
    assert "pickled" not in str(info.value)
