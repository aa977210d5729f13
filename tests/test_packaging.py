"""The distribution installs ONE import package (`trpr`) plus the two entry-script modules, and nothing of
ours shadows another distribution: Hugging Face's `kernels` (a transformers dependency) imports from the
repository root and from an installed copy, in fresh processes (docs/decisions.md, "One import package")."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = {"train_3rtpr", "eval_3rtpr"}
# what the fresh processes below run: HF `kernels` must be Hugging Face's, transformers' CLIP must build
CLIP_CHECK = """
import sys, kernels, transformers
from transformers import CLIPModel
import trpr, trpr.kernels
from trpr.modeling import small_clip_config
CLIPModel(small_clip_config())
print("kernels", kernels.__file__)
print("trpr", trpr.__file__)
print("trpr.kernels", trpr.kernels.__file__)
print("has_CUDAProperties", hasattr(kernels, "CUDAProperties") or hasattr(kernels, "get_kernel"))
"""


def _run(code: str, cwd: Path, env_extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "train_3rtpr.py", "eval_3rtpr.py"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "trpr", src / "trpr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def test_wheel_has_one_package_and_the_two_entry_scripts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"trpr", "train_3rtpr.py", "eval_3rtpr.py"}, sorted(top_level)
    dist_info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert set(zipfile.ZipFile(wheel).read(dist_info).decode().split()) == {"trpr"} | ENTRY_MODULES
    # the package data travels: recipes by name, the BPE vocabulary, the `evaluate` metric module
    for needed in ("trpr/configs/defaults.yaml", "trpr/configs/cuhk-pedes.yaml",
                   "trpr/data/assets/clip_bpe_simple_vocab_16e6.txt.gz",
                   "trpr/metrics/text_person_retrieval/text_person_retrieval.py"):
        assert needed in names, needed


def test_hf_kernels_and_clip_import_from_the_repository_root():
    """The failure of 2026-12-06: a top-level `kernels/` of ours shadowed Hugging Face's from the root."""
    pytest.importorskip("kernels")  # a transformers dependency in the lock; installed by `make setup`
    paths = _run(CLIP_CHECK, cwd=ROOT)
    # Hugging Face's, from site-packages (the .venv may live inside the checkout), never a `kernels/` of ours
    hf_kernels = Path(paths["kernels"]).resolve()
    assert "site-packages" in hf_kernels.parts and not hf_kernels.is_relative_to((ROOT / "kernels").resolve())
    assert not (ROOT / "kernels").exists()
    assert paths["has_CUDAProperties"] == "True"
    assert Path(paths["trpr"]).resolve() == (ROOT / "trpr" / "__init__.py").resolve()


def test_hf_kernels_and_clip_import_from_an_installed_copy(wheel, tmp_path):
    pytest.importorskip("kernels")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    paths = _run(CLIP_CHECK, cwd=cwd, env_extra={"PYTHONPATH": str(target)})
    assert Path(paths["trpr"]).resolve().is_relative_to(target.resolve())
    assert not Path(paths["kernels"]).resolve().is_relative_to(target.resolve())


def test_a_users_own_folders_named_like_ours_change_nothing(tmp_path):
    """A working directory with its own `data/`, `configs/`, `engine/` packages (common names) does not
    reach the library: every library import goes through `trpr`."""
    for name in ("data", "configs", "engine", "modeling", "evaluation", "metrics", "benchmarks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user folder {name}/ was imported')\n")
    code = ("import trpr.configs, trpr.data, trpr.engine, trpr.evaluation, trpr.reporting.leaderboard\n"
            "c = trpr.configs.load_config('synth-pedes')\n"
            "print('dataset', c['data']['dataset'])\n")
    out = _run(code, cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)})
    assert out["dataset"].startswith("synth-pedes")


def test_entry_scripts_run_from_another_directory(tmp_path):
    for script in ("train_3rtpr.py", "eval_3rtpr.py"):
        proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]
