"""Replayable attack on the command lines, as a hostile new user would try them (issue 21's closing check).

Every case runs the real commands as subprocesses (`train_3rtpr.py`, `eval_3rtpr.py`, `eval_3rtpr.py search`,
`python -m trpr.data.check`) on planted bad input, and classifies what happened:

    clear error    exit != 0, no 'Traceback', the last line names the problem (the case's pattern)
    ok             exit 0 and every checked fact holds
    TRACEBACK      a 'Traceback' anywhere in the output
    SILENT WRONG   exit 0 where an error was due, or a checked fact is wrong
    LOST WORK      a finished run (or part of one) is gone or changed
    CODE EXECUTED  a planted payload's marker file appeared (os.system ran)
    UNCLEAR ERROR  exit != 0 without a traceback, but the last line does not name the problem

Each case states its expected class (`clear error` or `ok`); a case passes when the outcome equals it.
The cases are the ones of issue 21 (1-11) and of the round before, issue 14 (1-10, 12); their ids say which.
One tiny 2-epoch run (synth-pedes-tiny, a random-init CLIP of width 32, 32x16 images) is trained once and
copied into each case that needs a run folder.

    python -m trpr.experiments.attack_replay --out runs/attack            # every case (79; 30 min with --jobs 2 on 2 loaded cores)
    python -m trpr.experiments.attack_replay --out runs/attack --quick    # the representative subset
    python -m trpr.experiments.attack_replay --out runs/attack --only i21-8 i14-7   # replaces these in OUT's report

Writes OUT/attack_results.json and OUT/attack_results.md and prints the totals per class; exit status 1
when any case lands outside its expected class. Each case's commands and full output are kept in
OUT/work/cases/<id>/output.txt. `--jobs 2` runs two cases at a time. The `disk full` and `read-only` cases
mount a small tmpfs and are reported as `skipped` where mounting is not allowed (not root).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
DATASET = "synth-pedes-tiny"
DATA_FOLDER = "SYNTH-PEDES-tiny"
TINY_BACKBONE = ("{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
                 "projection_dim: 32}")
CLASSES = ("ok", "clear error", "TRACEBACK", "SILENT WRONG", "LOST WORK", "CODE EXECUTED", "UNCLEAR ERROR")
BAD_CLASSES = CLASSES[2:]


class Payload:
    """A pickle that runs `touch MARKER` through os.system when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant_pickle(path: Path, marker: Path, *, torch_format: bool = False) -> None:
    """Write a payload at `path`: a bare pickle, or torch.save's zip layout (a pickle inside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        import torch

        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state": Payload(marker)}))


def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (hidden ones included)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


PROGRESS_BAR = re.compile(r"\d+%\|.*\|.*[\]]\s*$")


def last_line(text: str) -> str:
    """The last line that says something: blank lines and tqdm bars (drawn again when a process exits)
    are skipped; a carriage return ends a line as a terminal shows it."""
    lines = [line for raw in text.splitlines() for line in raw.split("\r")]
    lines = [line for line in lines if line.strip() and not PROGRESS_BAR.search(line)]
    return lines[-1].strip() if lines else ""


@dataclass
class Proc:
    command: list[str]
    rc: int
    out: str
    err: str
    seconds: float


@dataclass
class Verdict:
    """What a case observed: the process, the pattern its error must name, facts (description, holds)."""
    proc: Proc
    message: str | None = None          # regex the last line must match for a clear error
    message_anywhere: bool = False      # match against the whole output instead (data.check's report)
    facts: list[tuple[str, bool]] = field(default_factory=list)
    lost: list[tuple[str, bool]] = field(default_factory=list)   # facts whose failure means lost work
    markers: list[Path] = field(default_factory=list)


@dataclass
class Result:
    id: str
    source: str
    title: str
    expected: str
    outcome: str
    passed: bool
    exit_code: int | None
    seconds: float
    command: str
    last_line: str
    failed_facts: list[str]


@dataclass
class Case:
    id: str
    source: str
    title: str
    expected: str
    run: Callable[["Attack", Path], Verdict]
    quick: bool = False


CASES: list[Case] = []


def case(id: str, source: str, title: str, expected: str, quick: bool = False):
    def register(fn):
        CASES.append(Case(id, source, title, expected, fn, quick))
        return fn
    return register


def classify(verdict: Verdict, expected: str) -> tuple[str, list[str]]:
    proc = verdict.proc
    text = proc.out + "\n" + proc.err
    failed = [d for d, ok in verdict.facts if not ok]
    failed_lost = [d for d, ok in verdict.lost if not ok]
    if any(Path(m).exists() for m in verdict.markers):
        return "CODE EXECUTED", failed + failed_lost
    if failed_lost:
        return "LOST WORK", failed_lost + failed
    if "Traceback" in text:
        return "TRACEBACK", failed
    if proc.rc == 0:
        if expected == "clear error":
            return "SILENT WRONG", failed + ["exit status 0: the bad input was accepted"]
        return ("SILENT WRONG" if failed else "ok"), failed
    if verdict.message:
        where = text if verdict.message_anywhere else last_line(proc.err) or last_line(proc.out)
        if not re.search(verdict.message, where):
            return "UNCLEAR ERROR", failed + [f"the error does not match {verdict.message!r}"]
    if failed:
        return "SILENT WRONG", failed
    return "clear error", failed


class Attack:
    """The shared fixtures (one dataset, one trained run, one cache) and the command runners."""

    def __init__(self, out: Path, python: str = sys.executable, timeout: int = 300):
        self.out = out.resolve()
        self.python = python
        self.timeout = timeout
        self.work = self.out / "work"
        self.data_root = self.work / "datasets"
        self.cache = self.work / "cache"
        self.base_run = self.work / "base_run"
        self.hf_home = self.work / "hf_home"

    # ------------------------------------------------------------------------------------------- running
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), TRPR_CACHE=str(self.cache),
                   HF_HOME=str(self.hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TRITON_INTERPRET="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def command(self, kind: str, args: list[str]) -> list[str]:
        head = {"train": [self.python, str(ROOT / "train_3rtpr.py")],
                "eval": [self.python, str(ROOT / "eval_3rtpr.py")],
                "search": [self.python, str(ROOT / "eval_3rtpr.py"), "search"],
                "check": [self.python, "-m", "trpr.data.check"]}[kind]
        return head + [str(a) for a in args]

    def run(self, kind: str, args: list, *, cwd: Path | None = None, stdin: str | None = None,
            env: dict | None = None) -> Proc:
        cmd = self.command(kind, args)
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=cwd or self.work, env=env or self.env(), input=stdin, text=True,
                                  capture_output=True, timeout=self.timeout)
            rc, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as error:
            rc, out, err = -999, str(error.stdout or ""), str(error.stderr or "") + f"\n(timed out after {self.timeout} s)"
        return Proc(cmd, rc, out, err, time.perf_counter() - started)

    def train(self, *args, **kw) -> Proc:
        return self.run("train", list(args), **kw)

    def evaluate(self, *args, **kw) -> Proc:
        return self.run("eval", list(args), **kw)

    def search(self, *args, **kw) -> Proc:
        return self.run("search", list(args), **kw)

    def check(self, *args, **kw) -> Proc:
        return self.run("check", list(args), **kw)

    # ----------------------------------------------------------------------------------------- fixtures
    def tiny_args(self, root: Path | None = None) -> list[str]:
        return ["--config", "synth-pedes", "--data.dataset", DATASET, "--data.root", str(root or self.data_root),
                "--train.epochs", "2", "--train.batch_size", "48", "--data.image_size", "[32, 16]",
                "--model.fused_dim", "64", "--model.backbone", TINY_BACKBONE, "--logging.trackers", "[]",
                "--alr.drop_noisy", "true", "--optim.eps", "1e-3"]

    def prepare(self) -> None:
        """Generate synth-pedes-tiny and train the shared 2-epoch run (once per OUT)."""
        self.work.mkdir(parents=True, exist_ok=True)
        if (self.base_run / "last" / "training_state" / "trainer_state.json").is_file():
            return
        if self.base_run.exists():
            shutil.rmtree(self.base_run)
        proc = self.train(*self.tiny_args(), "--output-dir", self.base_run)
        if proc.rc != 0:
            raise RuntimeError(f"the shared run failed ({proc.rc}):\n{proc.err[-3000:]}")

    def copy_run(self, where: Path, name: str = "run") -> Path:
        target = where / name
        shutil.copytree(self.base_run, target)
        return target

    def copy_data(self, where: Path) -> tuple[Path, Path]:
        """(a private datasets root holding a copy of synth-pedes-tiny, its reid_raw.json)."""
        root = where / "datasets"
        shutil.copytree(self.data_root / DATA_FOLDER, root / DATA_FOLDER)
        return root, root / DATA_FOLDER / "reid_raw.json"

    def eval_args(self, checkpoint: Path, where: Path, root: Path | None = None) -> list:
        return ["--checkpoint", checkpoint, "--dataset", DATASET, "--root", root or self.data_root,
                "--out", where / "eval_out", "--batch-size", "32"]

    def search_args(self, checkpoint: Path, where: Path, root: Path | None = None, cache: Path | None = None) -> list:
        return ["--checkpoint", checkpoint, "--dataset", DATASET, "--root", root or self.data_root, "--top", "24",
                "--out", where / "search_out", "--cache-dir", cache or where / "search_cache"]


# ============================================================================ helpers used by the cases
def epochs_done(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "last" / "training_state" / "trainer_state.json").read_text())["epoch"] + 1
    except (OSError, ValueError, KeyError):
        return None


def listed_paths(out: str) -> list[str]:
    """The path (benchmark gallery) or file (folder gallery) column of search's table: its last column."""
    return [line.split()[-1] for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) >= 3]


def poison_weights(pair_dir: Path, member: str, key_part: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = pair_dir / member / "model.safetensors"
    state = load_file(str(weights))
    name = next(n for n in state if key_part in n)
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights), metadata={"format": "pt"})


def edit_annotation(annotation: Path, edit: Callable[[list], object]) -> None:
    entries = json.loads(annotation.read_text())
    edit(entries)
    annotation.write_text(json.dumps(entries))


def first_of(entries: list, split: str) -> dict:
    return next(e for e in entries if e["split"] == split)


class Mount:
    """A small tmpfs (root only): a full disk or a read-only file system, for real. `None` when unavailable."""

    def __init__(self, path: Path, size_kb: int, read_only: bool = False):
        self.path, self.options = path, f"size={size_kb}k" + (",ro" if read_only else "")
        self.mounted = False

    def __enter__(self):
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", self.options, "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        self.mounted = done.returncode == 0
        return self if self.mounted else None

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True, capture_output=True)

    def __exit__(self, *exc):
        if self.mounted:
            subprocess.run(["umount", str(self.path)], capture_output=True)


def skipped(reason: str) -> Verdict:
    return Verdict(Proc(["(skipped)"], 0, reason, "", 0.0))


# ===================================================================================== issue 21 cases
@case("i21-1a", "issue 21 #1", "train with lr 1e38: stops naming epoch and step, saves no best/ or last/",
      "clear error")
def _(a: Attack, d: Path) -> Verdict:
    run = d / "diverged"
    p = a.train(*a.tiny_args(), "--output-dir", run, "--train.epochs", "1", "--train.batch_size", "144",
                "--optim.backbone_lr", "1e38", "--optim.head_lr", "1e38")
    return Verdict(p, r"non-finite.*epoch 0|epoch 0.*non-finite",
                   facts=[("no best/ saved", not (run / "best").exists()), ("no last/ saved", not (run / "last").exists())])


@case("i21-1b", "issue 21 #1", "evaluate a pair whose projection weights are NaN: an error, no leaderboard",
      "clear error", quick=True)
def _(a, d):
    pair = d / "nan_pair"
    shutil.copytree(a.base_run / "best", pair)
    poison_weights(pair, "model_a", "text_projection")
    p = a.evaluate(*a.eval_args(pair, d))
    return Verdict(p, r"model A gives a non-finite", facts=[
        ("no leaderboard written", not (d / "eval_out" / "leaderboard.md").exists())])


@case("i21-1c", "issue 21 #1", "search with a pair whose image projection is NaN: an error, no ranking", "clear error")
def _(a, d):
    pair = d / "nan_pair"
    shutil.copytree(a.base_run / "best", pair)
    poison_weights(pair, "model_b", "visual_projection")
    p = a.search("a man", *a.search_args(pair, d), "--score", "A+B/GE+FS")
    return Verdict(p, r"model B gives a non-finite", facts=[("no ranking printed", "query:" not in p.out)])


@case("i21-2a", "issue 21 #2", "--overwrite a run with a new run that diverges in epoch 0: the old run survives",
      "clear error", quick=True)
def _(a, d):
    run = a.copy_run(d)
    before = tree_digest(run)
    p = a.train(*a.tiny_args(), "--output-dir", run, "--overwrite", "--train.epochs", "1", "--train.batch_size", "144",
                "--optim.backbone_lr", "1e38", "--optim.head_lr", "1e38")
    return Verdict(p, r"non-finite", lost=[("the previous run is back byte for byte", tree_digest(run) == before)])


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so that Python installs its Ctrl-C handler (a
    process started in the background of a non-interactive shell inherits SIGINT ignored, and Ctrl-C would
    then do nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_overwrite(a: Attack, d: Path, sig: int) -> Verdict:
    run = a.copy_run(d)
    before = tree_digest(run)
    cmd = a.command("train", [*a.tiny_args(), "--output-dir", run, "--overwrite", "--train.epochs", "3"])
    log, err_log = d / "stdout.txt", d / "stderr.txt"
    started = time.perf_counter()
    with open(log, "w") as out_file, open(err_log, "w") as err_file:
        child = subprocess.Popen(cmd, cwd=a.work, env=a.env(), stdout=out_file, stderr=err_file, text=True,
                                 preexec_fn=default_sigint)
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline and child.poll() is None:
            if "steps/epoch" in log.read_text() + err_log.read_text():
                break
            time.sleep(0.2)
        time.sleep(0.5)  # inside epoch 0
        sent = child.poll() is None
        if sent:
            child.send_signal(sig)
        child.wait(timeout=a.timeout)
    p = Proc(cmd + [f"(then {signal.Signals(sig).name} in epoch 0)"], child.returncode, log.read_text(),
             err_log.read_text(), time.perf_counter() - started)
    restored = tree_digest(run) == before
    return Verdict(p, r"interrupted|terminated", facts=[("the signal arrived during epoch 0", sent)],
                   lost=[("the previous run is back byte for byte", restored)])


@case("i21-2b", "issue 21 #2", "--overwrite, then Ctrl-C (SIGINT) during the new run's epoch 0", "clear error")
def _(a, d):
    return _interrupt_overwrite(a, d, signal.SIGINT)


@case("i21-2c", "issue 21 #2", "--overwrite, then SIGTERM during the new run's epoch 0", "clear error")
def _(a, d):
    return _interrupt_overwrite(a, d, signal.SIGTERM)


@case("i21-3", "issue 21 #3", "search, then the gallery loses an image (annotation and file): no stale cache", "ok",
      )
def _(a, d):
    root, annotation = a.copy_data(d)
    args = ["a woman in a red coat", *a.search_args(a.base_run, d, root)]
    first = a.search(*args)
    entries = json.loads(annotation.read_text())
    removed = first_of(entries, "test")
    entries.remove(removed)
    annotation.write_text(json.dumps(entries))
    removed_path = annotation.parent / "imgs" / removed["file_path"]
    removed_path.unlink()
    p = a.search(*args)
    listed = listed_paths(p.out)
    return Verdict(p, facts=[("the first search worked", first.rc == 0 and len(listed_paths(first.out)) == 24),
                             ("the second search re-encoded the gallery", "encoded and cached" in p.err),
                             ("23 images listed", len(listed) == 23),
                             ("the removed image is not listed", str(removed_path) not in listed),
                             ("every listed file exists", all(Path(x).is_file() for x in listed))])


@case("i21-4", "issue 21 #4", "--resume A --output-dir B: refused, B not created", "clear error")
def _(a, d):
    run = a.copy_run(d)
    other = d / "other"
    p = a.train("--resume", run, "--output-dir", other, "--train.epochs", "3")
    return Verdict(p, r"a run is continued in its own folder", facts=[("B was not created", not other.exists())])


def _changed_data(a: Attack, d: Path, change: str, allow: bool = False) -> tuple[Proc, Path]:
    run = a.copy_run(d)
    root, annotation = a.copy_data(d)
    entries = json.loads(annotation.read_text())
    first = entries.index(first_of(entries, "train"))
    if change == "shrink":
        del entries[first]
    else:
        image = annotation.parent / "imgs" / entries[first]["file_path"]
        shutil.copy(image, image.with_name("extra.png"))
        entries.append(dict(entries[first], file_path=str(Path(entries[first]["file_path"]).with_name("extra.png"))))
    annotation.write_text(json.dumps(entries))
    extra = ["--allow-changed-data"] if allow else []
    return a.train("--resume", run, "--train.epochs", "3", "--data.root", root, *extra), run


@case("i21-5a", "issue 21 #5", "--resume after the training set shrank", "clear error")
def _(a, d):
    p, run = _changed_data(a, d, "shrink")
    return Verdict(p, r"the training data changed", facts=[("nothing trained", epochs_done(run) == 2)])


@case("i21-5b", "issue 21 #5", "--resume after the training set grew", "clear error", quick=True)
def _(a, d):
    p, run = _changed_data(a, d, "grow")
    return Verdict(p, r"the training data changed", facts=[("nothing trained", epochs_done(run) == 2)])


@case("i21-5c", "issue 21 #5", "--resume --allow-changed-data after the set grew: continues on the new data", "ok")
def _(a, d):
    p, run = _changed_data(a, d, "grow", allow=True)
    return Verdict(p, facts=[("epoch 2 trained", epochs_done(run) == 3)])


@case("i21-6a", "issue 21 #6", "eval --out names a file: refused before any work", "clear error")
def _(a, d):
    target = d / "results.txt"
    target.write_text("keep me")
    args = a.eval_args(a.base_run, d)
    args[args.index("--out") + 1] = target
    p = a.evaluate(*args)
    return Verdict(p, r"--out .*is a file, not a folder", facts=[
        ("the file is untouched", target.read_text() == "keep me"),
        ("failed before the evaluation", "gallery images" not in p.err)])


@case("i21-6b", "issue 21 #6", "eval --out on a read-only file system: refused before any work", "clear error")
def _(a, d):
    with Mount(d / "ro", 1024, read_only=True) as mount:
        if mount is None:
            return skipped("mount unavailable (not root)")
        args = a.eval_args(a.base_run, d)
        args[args.index("--out") + 1] = mount.path / "out"
        p = a.evaluate(*args)
    return Verdict(p, r"--out .*cannot write there", facts=[("failed before the evaluation", "gallery images" not in p.err)])


@case("i21-6c", "issue 21 #6", "search - with non-Latin queries: one grid per query", "ok")
def _(a, d):
    queries = ["红色外套的女人", "青いジャケットの男", "A man, in a coat!", "a man in a coat"]
    p = a.search("-", *a.search_args(a.base_run, d), stdin="\n".join(queries) + "\n")
    grids = [line.split("grid: ")[1] for line in p.out.splitlines() if line.startswith("grid: ")]
    return Verdict(p, facts=[("4 grids, all different, all on disk",
                              len(grids) == 4 and len(set(grids)) == 4 and all(Path(g).is_file() for g in grids))])


@case("i21-7a", "issue 21 #7", "--resume with fewer epochs than done: refused, config.yaml unchanged", "clear error",
      )
def _(a, d):
    run = a.copy_run(d)
    before = (run / "config.yaml").read_text()
    p = a.train("--resume", run, "--train.epochs", "1")
    return Verdict(p, r"train.epochs 1 is fewer than the 2 epoch", facts=[
        ("config.yaml unchanged", (run / "config.yaml").read_text() == before)])


@case("i21-7b", "issue 21 #7", "--resume a run folder of a newer format_version", "clear error")
def _(a, d):
    run = a.copy_run(d)
    state = run / "last" / "training_state" / "trainer_state.json"
    state.write_text(json.dumps(dict(json.loads(state.read_text()), format_version=99)))
    p = a.train("--resume", run, "--train.epochs", "3")
    return Verdict(p, r"format_version 99 is newer")


@case("i21-7c", "issue 21 #7", "evaluate a model whose config.json has a newer format_version", "clear error")
def _(a, d):
    run = a.copy_run(d)
    config = run / "best" / "model_a" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), format_version=7)))
    p = a.evaluate(*a.eval_args(run, d))
    return Verdict(p, r"format_version 7 is newer")


STATE_FILES = ["rng_0", "alr_state", "optimizer_a", "optimizer_b", "scheduler_a", "scheduler_b"]


@case("i21-8-state", "issue 21 #8", "os.system pickles planted as every last/training_state/*.safetensors, --resume",
      "clear error")
def _(a, d):
    run = a.copy_run(d)
    marker = d / "CODE-RAN"
    for name in STATE_FILES:  # rng_0 in torch.save's zip layout, the others bare pickles
        plant_pickle(run / "last" / "training_state" / f"{name}.safetensors", marker, torch_format=name == "rng_0")
    p = a.train("--resume", run, "--train.epochs", "3")
    return Verdict(p, r"(" + "|".join(STATE_FILES) + r").safetensors: not a training-state file", markers=[marker])


@case("i21-8-old-pt", "issue 21 #8", "an old pickled run folder (training_state/*.pt, each an os.system pickle)",
      "clear error")
def _(a, d):
    run = a.copy_run(d)
    marker = d / "CODE-RAN"
    for path in (run / "last" / "training_state").glob("*.safetensors"):
        path.unlink()
        plant_pickle(path.with_suffix(".pt"), marker, torch_format=True)
    p = a.train("--resume", run, "--train.epochs", "3")
    return Verdict(p, r"earlier pickled .pt format", markers=[marker])


@case("i21-8-weights", "issue 21 #8", "os.system pickle as best/model_a/model.safetensors (+ pytorch_model.bin)",
      "clear error", quick=True)
def _(a, d):
    run = a.copy_run(d)
    marker = d / "CODE-RAN"
    plant_pickle(run / "best" / "model_a" / "model.safetensors", marker, torch_format=True)
    plant_pickle(run / "best" / "model_a" / "pytorch_model.bin", marker, torch_format=True)
    p = a.evaluate(*a.eval_args(run, d))
    return Verdict(p, r"model_a", markers=[marker])


@case("i21-8-bin-beside", "issue 21 #8", "an os.system pytorch_model.bin beside good weights: evaluation ignores it",
      "ok")
def _(a, d):
    run = a.copy_run(d)
    marker = d / "CODE-RAN"
    for member in ("model_a", "model_b"):
        plant_pickle(run / "best" / member / "pytorch_model.bin", marker, torch_format=True)
    p = a.evaluate(*a.eval_args(run, d))
    return Verdict(p, markers=[marker], facts=[("results written", (d / "eval_out" / "results.json").is_file())])


@case("i21-8-search-cache", "issue 21 #8", "os.system pickles planted over every file of the search cache", "ok")
def _(a, d):
    marker = d / "CODE-RAN"
    args = ["a man", *a.search_args(a.base_run, d)]
    first = a.search(*args)
    cache = d / "search_cache"
    planted = [p for p in cache.rglob("*") if p.is_file()]
    for path in planted:
        plant_pickle(path, marker, torch_format=path.suffix in (".pt", ".safetensors"))
    p = a.search(*args)
    return Verdict(p, markers=[marker], facts=[("the cache held files to plant", first.rc == 0 and bool(planted)),
                                               ("the gallery was rebuilt", "encoded and cached" in p.err),
                                               ("24 matches listed", len(listed_paths(p.out)) == 24)])


@case("i21-8-folder-index", "issue 21 #8", "os.system pickles over a folder gallery's index (search --gallery)", "ok")
def _(a, d):
    marker = d / "CODE-RAN"
    gallery = d / "photos"
    shutil.copytree(a.data_root / DATA_FOLDER / "imgs" / "test", gallery)
    args = ["a man", "--checkpoint", a.base_run, "--gallery", gallery, "--top", "5", "--out", d / "out",
            "--cache-dir", d / "cache"]
    first = a.search(*args)
    planted = [p for p in (d / "cache").rglob("*") if p.is_file()]
    for path in planted:
        plant_pickle(path, marker, torch_format=True)
    p = a.search(*args)
    return Verdict(p, markers=[marker], facts=[("the index held files to plant", first.rc == 0 and bool(planted)),
                                               ("5 matches listed", len(listed_paths(p.out)) == 5)])


@case("i21-8-image-cache", "issue 21 #8", "os.system pickles over the image-check cache, then training", "ok")
def _(a, d):
    marker = d / "CODE-RAN"
    cache = d / "cache"
    shutil.copytree(a.cache, cache, ignore=shutil.ignore_patterns("search-features"))
    planted = [p for p in (cache / "image_checks").rglob("*") if p.is_file()]
    for path in planted:
        plant_pickle(path, marker)
    run = d / "run"
    p = a.train(*a.tiny_args(), "--output-dir", run, "--train.epochs", "1", env=a.env(TRPR_CACHE=str(cache)))
    return Verdict(p, markers=[marker], facts=[("the cache held files to plant", bool(planted)),
                                               ("epoch 0 trained", epochs_done(run) == 1)])


@case("i21-8-noise", "issue 21 #8", "--data.noise_file is an os.system pickle (.npy)", "clear error")
def _(a, d):
    marker = d / "CODE-RAN"
    noise = d / "noise.npy"
    plant_pickle(noise, marker)
    p = a.train(*a.tiny_args(), "--output-dir", d / "run", "--data.noise_rate", "0.2", "--data.noise_file", noise)
    return Verdict(p, r"noise", markers=[marker], facts=[("no run folder left", not (d / "run" / "last").exists())])


@case("i21-8-yaml", "issue 21 #8", "a run's config.yaml with a !!python/object/apply:os.system tag, --resume",
      "clear error", quick=True)
def _(a, d):
    run = a.copy_run(d)
    marker = d / "CODE-RAN"
    config = run / "config.yaml"
    config.write_text(f"x: !!python/object/apply:os.system [\"touch '{marker}'\"]\n" + config.read_text())
    p = a.train("--resume", run, "--train.epochs", "3")
    return Verdict(p, r"config", markers=[marker])


@case("i21-8-recipe", "issue 21 #8", "a --config recipe with a !!python/object/apply:os.system tag", "clear error")
def _(a, d):
    marker = d / "CODE-RAN"
    recipe = d / "recipe.yaml"
    recipe.write_text(f"base: synth-pedes\nx: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")
    p = a.train("--config", recipe, "--output-dir", d / "run")
    return Verdict(p, r"recipe.yaml", markers=[marker])


def _escape(a: Attack, d: Path, split: str, absolute: bool) -> tuple[Path, str]:
    root, annotation = a.copy_data(d)
    secret = d / "secret" / "x.png"
    secret.parent.mkdir()
    entries = json.loads(annotation.read_text())
    entry = first_of(entries, split)
    shutil.copy(annotation.parent / "imgs" / entry["file_path"], secret)  # a real image: only the rule stops it
    bad = str(secret) if absolute else os.path.relpath(secret, annotation.parent / "imgs")
    entry["file_path"] = bad
    annotation.write_text(json.dumps(entries))
    return root, bad


@case("i21-9a", "issue 21 #9", "data.check on an annotation whose image path is ../../secret/x.png", "clear error",
      quick=True)
def _(a, d):
    root, bad = _escape(a, d, "train", absolute=False)
    p = a.check(DATASET, "--root", root)
    return Verdict(p, re.escape(f"has image path {bad!r}, which leaves the image folder"), message_anywhere=True)


@case("i21-9b", "issue 21 #9", "train on an annotation whose image path is absolute (outside the dataset)",
      "clear error")
def _(a, d):
    root, _ = _escape(a, d, "train", absolute=True)
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run")
    return Verdict(p, r"leaves the image folder", facts=[("no run folder", not (d / "run").exists())])


@case("i21-9c", "issue 21 #9", "search a gallery whose annotation points at ../../secret/x.png", "clear error")
def _(a, d):
    root, _ = _escape(a, d, "test", absolute=False)
    p = a.search("a man", *a.search_args(a.base_run, d, root))
    return Verdict(p, r"leaves the image folder", facts=[("secret not listed", "secret" not in p.out)])


@case("i21-9d", "issue 21 #9", "pair.json members pointing outside the pair folder", "clear error")
def _(a, d):
    pair = d / "pair"
    shutil.copytree(a.base_run / "best", pair)
    shutil.move(pair / "model_a", d / "elsewhere")
    config = json.loads((pair / "pair.json").read_text())
    (pair / "pair.json").write_text(json.dumps(dict(config, members=["../elsewhere", "model_b"])))
    p = a.evaluate(*a.eval_args(pair, d))
    return Verdict(p, r"is not a folder inside the pair folder")


BAD_VALUES = [
    ("lr-neg", ["--optim.backbone_lr", "-1e-5"], r"optim.backbone_lr must be >= 0"),
    ("lr-zero", ["--optim.head_lr", "0"], r"optim.head_lr must be > 0"),
    ("lr-inf", ["--optim.head_lr", ".inf"], r"optim.head_lr must be a finite number"),
    ("lr-nan", ["--optim.backbone_lr", ".nan"], r"optim.backbone_lr must be a finite number"),
    ("loss-weight", ["--loss.lambda_sdm", "-1"], r"loss.lambda_sdm must be >= 0"),
    ("fused-dim", ["--model.fused_dim", "0"], r"model.fused_dim must be > 0"),
    ("log-every", ["--train.log_every", "0"], r"train.log_every must be >= 1"),
    ("eval-batch", ["--eval.batch_size", "0"], r"eval.batch_size must be >= 1"),
    ("workers", ["--data.num_workers", "-1"], r"data.num_workers must be >= 0"),
    ("seed", ["--seed", "-3"], r"seed must be >= 0"),
    ("betas", ["--optim.betas", "[0.9, 1.0]"], r"optim.betas\[1\] must lie in \[0, 1\)"),
    ("warmup", ["--optim.warmup_epochs", "-1"], r"optim.warmup_epochs must be >= 0"),
    ("sharpness", ["--alr.sharpness", "0"], r"alr.sharpness must be > 0"),
    ("image-size", ["--data.image_size", "[30, 16]"], r"data.image_size \[30, 16\] must be divisible"),
    ("heads", ["--model.backbone", "{hidden_size: 30, num_attention_heads: 4}"], r"not divisible by its 4 attention heads"),
    ("epochs", ["--train.epochs", "0"], r"train.epochs"),
    ("type", ["--train.batch_size", "many"], r"train.batch_size"),
    ("unknown-key", ["--train.epoch", "3"], r"train.epoch"),
]

for _slug, _overrides, _message in BAD_VALUES:
    def _bad_value(a, d, _o=_overrides, _m=_message):
        p = a.train(*a.tiny_args(), "--output-dir", d / "run", *_o)
        return Verdict(p, _m, facts=[("no run folder", not (d / "run").exists()),
                                     ("stopped before reading data", "synth-pedes-tiny: split" not in p.out + p.err)])
    case(f"i21-10-{_slug}", "issue 21 #10", f"config value {' '.join(_overrides)}", "clear error",
         quick=_slug == "lr-inf")(_bad_value)


@case("i21-10-base", "issue 21 #10", "a recipe whose base: is a number", "clear error")
def _(a, d):
    recipe = d / "recipe.yaml"
    recipe.write_text("base: 3\ntrain:\n  epochs: 2\n")
    p = a.train("--config", recipe, "--output-dir", d / "run")
    return Verdict(p, r"base must be a recipe name or path")


@case("i21-11a", "issue 21 #11", "a damaged tokenizer cache (vocab.json cut short), then search", "ok")
def _(a, d):
    cache = d / "cache"
    shutil.copytree(a.cache, cache, ignore=shutil.ignore_patterns("search-features", "image_checks"))
    vocab = cache / "clip_bpe" / "vocab.json"
    if not vocab.is_file():
        return Verdict(Proc(["(setup)"], 0, "", "", 0.0), facts=[(f"{vocab} exists after the shared run", False)])
    vocab.write_text(vocab.read_text()[:5000])
    p = a.search("a man in a red coat", *a.search_args(a.base_run, d), env=a.env(TRPR_CACHE=str(cache)))
    return Verdict(p, facts=[("the damaged file is named", f"{vocab}: damaged tokenizer cache" in p.err),
                             ("24 matches listed", len(listed_paths(p.out)) == 24)])


@case("i21-11b", "issue 21 #11", "Ctrl-C (SIGINT) while `search -` waits for the next query", "clear error")
def _(a, d):
    cmd = a.command("search", ["-", *a.search_args(a.base_run, d)])
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=a.work, env=a.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    child.stdin.write("a man in a black jacket\n")
    child.stdin.flush()
    out_lines = []
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        out_lines.append(line)
        if line.startswith("grid: "):
            break
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=a.timeout)
    p = Proc(cmd + ["(one query, then SIGINT)"], child.returncode, "".join(out_lines) + out, err,
             time.perf_counter() - started)
    return Verdict(p, r"^eval_3rtpr.py: interrupted$", facts=[("the first query was answered", "grid: " in p.out),
                                                               ("exit status 130", p.rc == 130)])


@case("i21-11c", "issue 21 #11", "a query longer than the text context", "ok")
def _(a, d):
    words = " ".join(["a tall man with a black backpack and grey shoes"] * 10)
    p = a.search(words, *a.search_args(a.base_run, d))
    return Verdict(p, facts=[("says it was truncated", "truncated" in p.err)])


@case("i21-11d", "issue 21 #11", "every training image unreadable, --data.image_policy skip", "clear error")
def _(a, d):
    root, annotation = a.copy_data(d)
    for entry in json.loads(annotation.read_text()):
        if entry["split"] == "train":
            (annotation.parent / "imgs" / entry["file_path"]).write_bytes(b"not a png")
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run", "--data.image_policy", "skip")
    return Verdict(p, r"every image of synth-pedes-tiny/train is unusable", facts=[
        ("no batch-size hint", "batch_size" not in last_line(p.err)), ("no run folder", not (d / "run").exists())])


# ===================================================================================== issue 14 cases
@case("i14-1a", "issue 14 #1", "a new run into a folder that holds a run, without --overwrite", "clear error",
      )
def _(a, d):
    run = a.copy_run(d)
    before = tree_digest(run)
    p = a.train(*a.tiny_args(), "--output-dir", run)
    return Verdict(p, r"already holds a run", lost=[("the run is untouched", tree_digest(run) == before)])


@case("i14-1b", "issue 14 #1", "--resume a run folder another training holds (its lock is taken)", "clear error")
def _(a, d):
    from trpr.runtime.run_folder import RunLock

    run = a.copy_run(d)
    lock = RunLock(run)
    lock.acquire()
    try:
        before = tree_digest(run)
        p = a.train("--resume", run, "--train.epochs", "3")
        after = tree_digest(run)
    finally:
        lock.release()
    return Verdict(p, r"is in use by pid", lost=[("the run is untouched", after == before)])


@case("i14-2a", "issue 14 #2", "SIGKILL between last/'s swap and the metrics append, then --resume", "ok")
def _(a, d):
    run = d / "killed"
    killed = a.train(*a.tiny_args(), "--output-dir", run, env=a.env(TRPR_KILL_AT="last:swapped"))
    p = a.train("--resume", run)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    return Verdict(p, facts=[("the first run was killed", killed.rc == -9),
                             ("metrics.jsonl holds epochs 0 and 1", epochs == [0, 1])])


@case("i14-2b", "issue 14 #2", "a torn last line in metrics.jsonl, then --resume", "ok")
def _(a, d):
    run = a.copy_run(d)
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"epoch": 2, "loss_a": 0.5, "lo')
    p = a.train("--resume", run, "--train.epochs", "3")
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    return Verdict(p, facts=[("metrics.jsonl holds epochs 0, 1, 2", epochs == [0, 1, 2])])


@case("i14-2c", "issue 14 #2", "evaluate a run killed inside best/'s swap (.best.old left)", "ok")
def _(a, d):
    run = a.copy_run(d)
    (run / "best").rename(run / ".best.old")
    p = a.evaluate(*a.eval_args(run, d))
    results = d / "eval_out" / "results.json"
    pair_dir = json.loads(results.read_text())["checkpoints"][0]["pair_dir"] if results.is_file() else None
    return Verdict(p, facts=[("best/ evaluated, not last/", pair_dir == str(run / "best")),
                             ("best/ restored", (run / "best" / "pair.json").is_file())])


@case("i14-3", "issue 14 #3", "disk full while writing a checkpoint (a real tmpfs), then --resume elsewhere",
      "clear error")
def _(a, d):
    size_kb = sum(p.stat().st_size for p in a.base_run.rglob("*") if p.is_file()) // 1024 + 4096
    with Mount(d / "small", size_kb) as mount:
        if mount is None:
            return skipped("mount unavailable (not root)")
        run = a.copy_run(mount.path)
        p = a.train("--resume", run, "--train.epochs", "3")
        leftovers = [x.name for x in run.iterdir() if x.name.startswith(".") and x.name != ".run.lock"]
        state_ok = epochs_done(run) == 2
        rescued = a.copy_run(d, "rescued")
        shutil.rmtree(rescued)
        shutil.copytree(run, rescued)
    again = a.train("--resume", rescued, "--train.epochs", "3")
    return Verdict(p, r"no space left on", facts=[("no temporary folder left", not leftovers),
                                                  ("--resume on a disk with space trains on", again.rc == 0
                                                   and epochs_done(rescued) == 3)],
                   lost=[("last/ of epoch 1 kept", state_ok)])


@case("i14-4", "issue 14 #4", "two searches at once with a cold gallery cache", "ok")
def _(a, d):
    cmd = a.command("search", ["a man", *a.search_args(a.base_run, d)])
    started = time.perf_counter()
    children = [subprocess.Popen(cmd, cwd=a.work, env=a.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    outputs = [c.communicate(timeout=a.timeout) for c in children]
    rc = max(abs(c.returncode) for c in children)
    p = Proc(cmd + ["(twice, concurrently)"], rc, "\n".join(o[0] for o in outputs), "\n".join(o[1] for o in outputs),
             time.perf_counter() - started)
    return Verdict(p, facts=[("both list 24 matches", all(len(listed_paths(o[0])) == 24 for o in outputs))])


def _damage_image(a: Attack, d: Path, split: str, how: str) -> tuple[Path, Path]:
    from PIL import Image

    root, annotation = a.copy_data(d)
    image = annotation.parent / "imgs" / first_of(json.loads(annotation.read_text()), split)["file_path"]
    if how == "truncated":
        image.write_bytes(image.read_bytes()[:70])
    else:
        Image.new("RGB", (1, 1)).save(image)
    return root, image


@case("i14-5a", "issue 14 #5", "a truncated training image: stops before training, names the file", "clear error",
      )
def _(a, d):
    root, image = _damage_image(a, d, "train", "truncated")
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run")
    return Verdict(p, r"skip|unusable", facts=[("the file is named", str(image) in p.err),
                                               ("no run folder", not (d / "run").exists())])


@case("i14-5b", "issue 14 #5", "a truncated validation image: stops before epoch 0", "clear error")
def _(a, d):
    root, image = _damage_image(a, d, "val", "truncated")
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run")
    return Verdict(p, r"skip|unusable", facts=[("the file is named", str(image) in p.err),
                                               ("no epoch trained", "epoch 0:" not in p.out + p.err)])


@case("i14-5c", "issue 14 #5", "a truncated training image with --data.image_policy skip: trains without it", "ok")
def _(a, d):
    root, image = _damage_image(a, d, "train", "truncated")
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run", "--train.epochs", "1", "--data.image_policy", "skip")
    return Verdict(p, facts=[("the skipped file is reported", str(image) in p.out + p.err),
                             ("epoch 0 trained", epochs_done(d / "run") == 1)])


@case("i14-6a", "issue 14 #6", "a 1x1 training image: refused, named", "clear error")
def _(a, d):
    root, image = _damage_image(a, d, "train", "tiny")
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run")
    return Verdict(p, r"skip|unusable", facts=[("the file is named with its size", f"{image}: image is 1x1" in p.err)])


@case("i14-6b", "issue 14 #6", "an exactly repeated annotation entry: dropped with a warning by the loader and "
      "data.check alike, no duplicated training rows", "ok")
def _(a, d):
    root, annotation = a.copy_data(d)
    edit_annotation(annotation, lambda entries: entries.append(dict(first_of(entries, "train"))))
    check = a.check(DATASET, "--root", root)
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run", "--train.epochs", "1")
    return Verdict(p, facts=[("data.check reports the duplicate", "duplicate" in (check.out + check.err).lower()
                              and "Traceback" not in check.err),
                             ("training warns about it", "duplicate entries" in p.err),
                             ("144 training samples, not 146", "144 training samples" in p.out)])


@case("i14-6c", "issue 14 #6", "one image listed twice with different captions: refused by the loader and data.check",
      "clear error")
def _(a, d):
    root, annotation = a.copy_data(d)
    edit_annotation(annotation, lambda entries: entries.append(dict(first_of(entries, "train"),
                                                                    captions=["someone else entirely"])))
    check = a.check(DATASET, "--root", root)
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run")
    return Verdict(p, r"duplicate path|lists the image of entry", facts=[
        ("data.check fails naming it", check.rc != 0 and "duplicate path" in (check.out + check.err).lower()),
        ("no run folder", not (d / "run").exists())])


@case("i14-7a", "issue 14 #7", "--resume with a truncated last/model_a/model.safetensors", "clear error")
def _(a, d):
    run = a.copy_run(d)
    weights = run / "last" / "model_a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    p = a.train("--resume", run, "--train.epochs", "3")
    return Verdict(p, r"model.safetensors: not a readable safetensors file")


@case("i14-7b", "issue 14 #7", "evaluate and search with a garbage best/model_b/model.safetensors", "clear error")
def _(a, d):
    run = a.copy_run(d)
    (run / "best" / "model_b" / "model.safetensors").write_bytes(b"garbage" * 10)
    first = a.evaluate(*a.eval_args(run, d))
    p = a.search("a man", *a.search_args(run, d))
    return Verdict(p, r"model_b/model.safetensors", facts=[
        ("evaluate: one line naming the file", first.rc != 0 and "Traceback" not in first.err
         and "model_b/model.safetensors" in last_line(first.err))])


@case("i14-7c", "issue 14 #7", "invalid UTF-8 in the annotation file", "clear error")
def _(a, d):
    root, annotation = a.copy_data(d)
    annotation.write_bytes(annotation.read_bytes()[:200] + b"\xff\xfe" + annotation.read_bytes()[200:])
    check = a.check(DATASET, "--root", root)
    p = a.train(*a.tiny_args(root), "--output-dir", d / "run")
    return Verdict(p, re.escape(str(annotation)), facts=[
        ("data.check names the file", check.rc != 0 and "Traceback" not in check.err
         and str(annotation) in check.out + check.err)])


@case("i14-7d", "issue 14 #7", "train.batch_size larger than the training set", "clear error")
def _(a, d):
    p = a.train(*a.tiny_args(), "--output-dir", d / "run", "--train.batch_size", "4000")
    return Verdict(p, r"train.batch_size=4000 is larger than the training set", facts=[
        ("no run folder", not (d / "run").exists())])


@case("i14-7e", "issue 14 #7", "--resume with another model size", "clear error")
def _(a, d):
    run = a.copy_run(d)
    p = a.train("--resume", run, "--train.epochs", "3", "--model.fused_dim", "32")
    return Verdict(p, r"in the checkpoint but .* in the model the config builds",
                   facts=[("nothing trained", epochs_done(run) == 2)])


@case("i14-8a", "issue 14 #8", "search --top 100000", "clear error")
def _(a, d):
    p = a.search("a man", *a.search_args(a.base_run, d)[:-4], "--top", "100000")
    return Verdict(p, r"--top")


@case("i14-8b", "issue 14 #8", "--data.noise_rate 1.0", "clear error")
def _(a, d):
    p = a.train(*a.tiny_args(), "--output-dir", d / "run", "--data.noise_rate", "1.0")
    return Verdict(p, r"noise_rate")


@case("i14-8c", "issue 14 #8", "--data.noise_file of garbage bytes", "clear error")
def _(a, d):
    noise = d / "noise.npy"
    noise.write_bytes(b"\x93NUMPY garbage" * 5)
    p = a.train(*a.tiny_args(), "--output-dir", d / "run", "--data.noise_rate", "0.2", "--data.noise_file", noise)
    return Verdict(p, re.escape(str(noise)))


@case("i14-8d", "issue 14 #8", "--eval.split that the dataset lacks", "clear error")
def _(a, d):
    p = a.train(*a.tiny_args(), "--output-dir", d / "run", "--eval.split", "dev")
    return Verdict(p, r"eval.split", facts=[("no run folder", not (d / "run").exists())])


@case("i14-9", "issue 14 #9", "the default recipe (cuhk-pedes) offline with an empty Hub cache", "clear error",
      )
def _(a, d):
    p = a.train("--config", "cuhk-pedes", "--data.root", d / "nothing", "--output-dir", d / "run",
                env=a.env(HF_HOME=str(d / "empty_hf")))
    return Verdict(p, r"--model.backbone", facts=[("no run folder", not (d / "run").exists()),
                                                  ("under 60 s", p.seconds < 60)])


@case("i14-10", "issue 14 #10", "search ranks with the row the run was selected on and says so", "ok")
def _(a, d):
    import yaml

    row = yaml.safe_load((a.base_run / "config.yaml").read_text())["eval"]["select_row"]
    p = a.search("a man", *a.search_args(a.base_run, d))
    return Verdict(p, facts=[(f"ranks with {row} and says so", f"ranking with {row} (the row the run was selected on"
                              in p.out + p.err)])


@case("i14-12", "issue 14 #12", "train_3rtpr.py --help lists the config sections and points to defaults.yaml", "ok")
def _(a, d):
    p = a.train("--help")
    sections = ("data", "model", "loss", "alr", "optim", "train", "eval", "logging")
    return Verdict(p, facts=[("every config section listed", all(f"  {s}: " in p.out for s in sections)),
                             ("points to defaults.yaml", "trpr/configs/defaults.yaml" in p.out)])


# ============================================================================================ the runner
def run_cases(attack: Attack, cases: list[Case], log=print, jobs: int = 1) -> list[Result]:
    """Run `cases` (`jobs` at a time; each case's commands stay sequential) and return their results in order."""
    attack.prepare()
    if jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            done = pool.map(lambda item: run_cases_one(attack, item[1], item[0], len(cases), log), enumerate(cases, 1))
            return list(done)
    return [run_cases_one(attack, c, index, len(cases), log) for index, c in enumerate(cases, 1)]


def run_cases_one(attack: Attack, c: Case, index: int, count: int, log=print) -> Result:
    folder = attack.work / "cases" / c.id
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    try:
        verdict = c.run(attack, folder)
        outcome, failed = classify(verdict, c.expected)
        if verdict.proc.command == ["(skipped)"]:
            outcome, failed = "skipped", [verdict.proc.out]
    except Exception as error:  # the harness itself failed: reported, never counted as a pass
        verdict = Verdict(Proc(["(harness)"], -1, "", repr(error), 0.0))
        outcome, failed = "HARNESS ERROR", [repr(error)]
    proc = verdict.proc
    result = Result(c.id, c.source, c.title, c.expected, outcome, outcome in (c.expected, "skipped"),
                    proc.rc, round(time.perf_counter() - started, 1),
                    " ".join(_short(x, attack) for x in proc.command), _short(last_line(proc.err) or
                                                                             last_line(proc.out), attack)[:300],
                    failed)
    (folder / "output.txt").write_text(f"$ {result.command}\nexit {proc.rc}\n--- stdout\n{proc.out}\n"
                                       f"--- stderr\n{proc.err}\n")
    log(f"[{index}/{count}] {c.id:24s} {outcome:14s} (expected {c.expected}) {result.seconds:5.1f} s"
        + ("" if result.passed else f"   <-- {failed}"), flush=True)
    return result


def _short(text: str, attack: Attack) -> str:
    return str(text).replace(str(attack.work), "$W").replace(str(ROOT), "$REPO").replace(sys.executable, "python")


def totals(results: list[Result]) -> dict[str, int]:
    counts = {name: 0 for name in CLASSES}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return counts


def markdown(results: list[Result], command: str) -> str:
    counts = totals(results)
    lines = [f"Attack replay, {datetime.date.today().isoformat()}: {command}", "",
             "Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
             f"Cases as expected: {sum(r.passed for r in results)} of {len(results)}", "",
             "| case | from | what was tried | expected | outcome | exit | s | last line |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r.last_line.replace("|", "\\|")
        if len(last) > 140:
            last = last[:137] + "..."
        mark = r.outcome if r.passed else f"**{r.outcome}**"
        lines.append(f"| {r.id} | {r.source} | {r.title.replace('|', '/')} | {r.expected} | {mark} | {r.exit_code} | "
                     f"{r.seconds:.0f} | {last} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for attack_results.json/.md and the work")
    parser.add_argument("--quick", action="store_true", help="only the representative subset")
    parser.add_argument("--only", nargs="*", default=None, help="case ids or id prefixes")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the commands")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at a time (default 1)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if (not args.quick or c.quick)
             and (args.only is None or any(c.id == o or c.id.startswith(o + "-") or c.id.startswith(o)
                                           for o in args.only))]
    if args.list:
        for c in cases:
            print(f"{c.id:24s} {c.expected:12s} {c.title}")
        return 0
    attack = Attack(args.out, args.python)
    results = run_cases(attack, cases, jobs=args.jobs)
    command = "python -m trpr.experiments.attack_replay " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = [command]
    saved = args.out / "attack_results.json"
    if args.only is not None and saved.is_file():  # a rerun of some cases replaces them in the earlier report
        earlier = json.loads(saved.read_text())
        rerun = {r.id: r for r in results}
        merged = {c["id"]: Result(**c) for c in earlier["cases"]}
        merged.update(rerun)
        order = [c.id for c in CASES]
        results = sorted(merged.values(), key=lambda r: order.index(r.id) if r.id in order else len(order))
        commands = earlier.get("commands", [earlier.get("command")]) + [f"{command}  (rerun: {sorted(rerun)})"]
    args.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(
        {"date": datetime.date.today().isoformat(), "commands": commands, "totals": totals(results),
         "cases": [asdict(r) for r in results]}, indent=2, ensure_ascii=False))
    (args.out / "attack_results.md").write_text(markdown(results, "; ".join(f"`{c}`" for c in commands)))
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals(results).items() if v or k in CLASSES))
    bad = [r for r in results if not r.passed]
    print(f"{len(results) - len(bad)} of {len(results)} cases as expected" + (f"; not: {[r.id for r in bad]}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
