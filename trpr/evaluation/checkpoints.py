"""What the evaluation reads: checkpoints named on the command line (run folders or pair folders, or
Hub repo ids) and evaluation splits, with bad input reported as one-line `EvalInputError`s."""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from trpr import data
from trpr import modeling
from trpr.data.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE
from trpr.modeling.hub import resolve_pretrained_folder
from trpr.modeling.model import CONFIG_NAME as MODEL_CONFIG_NAME
from trpr.modeling.model import WEIGHTS_NAME as MODEL_WEIGHTS_NAME
from trpr.modeling.pair import MEMBER_DIRS, PAIR_CONFIG_NAME
from trpr.runtime.errors import first_line
from trpr.runtime.run_folder import (CHECKPOINT_DIRS, CONFIG_FILE, describe_holder, interrupted_swap, lock_holder,
                                     recover_interrupted_swap, selected_checkpoint)


class EvalInputError(Exception):
    """Bad user input (checkpoint, dataset, split): reported as one line on stderr, exit status 2."""


@dataclass
class Checkpoint:
    """A checkpoint named on the command line.

    name: label in tables; path: as given; pair_dir: the folder ReciprocalPair.from_pretrained reads;
    run_config: the run's config.yaml (dict) when a run folder (or its best/ / last/) was given, else None.
    """

    name: str
    path: Path
    pair_dir: Path
    run_config: dict | None = None


def _read_run_config(run_dir: Path) -> dict | None:
    import yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise EvalInputError(f"checkpoint {run_dir}: {path.name} is not valid YAML ({first_line(error)})") from error
    if not isinstance(config, dict):
        raise EvalInputError(f"checkpoint {run_dir}: {path.name} does not hold a mapping")
    return config


def _pair_member_dirs(pair_dir: Path) -> list[str]:
    """Member folder names from pair.json when it is readable, else the default (model_a, model_b)."""
    try:
        members = json.loads((pair_dir / PAIR_CONFIG_NAME).read_text()).get("members")
    except (OSError, ValueError, AttributeError):
        members = None
    if isinstance(members, list) and len(members) == 2 and all(isinstance(m, str) for m in members):
        return members
    return list(MEMBER_DIRS)


def _looks_like_pair_dir(folder: Path) -> bool:
    return (folder / PAIR_CONFIG_NAME).is_file() or any((folder / member).is_dir() for member in MEMBER_DIRS)


def _missing_pair_files(pair_dir: Path) -> list[str]:
    """Relative paths a ReciprocalPair folder needs and `pair_dir` lacks."""
    needed = [PAIR_CONFIG_NAME] + [f"{member}/{name}" for member in _pair_member_dirs(pair_dir)
                                   for name in (MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME)]
    return [name for name in needed if not (pair_dir / name).is_file()]


def _pair_layout_hint() -> str:
    return f"{PAIR_CONFIG_NAME} + {'/, '.join(MEMBER_DIRS)}/ with {MODEL_CONFIG_NAME} and {MODEL_WEIGHTS_NAME}"


def recover_run_checkpoints(run_dir: Path) -> None:
    """Before a run folder's best/ or last/ is chosen: a swap interrupted between its two renames left
    the previous copy as `.<name>.old` without `<name>/`; move it back (with a note on stderr) unless a
    running training owns the folder (then that swap is in progress: EvalInputError, try again). A
    folder that cannot be written gets an EvalInputError saying which rename to do."""
    for name in CHECKPOINT_DIRS:
        folder = run_dir / name
        old = interrupted_swap(folder)
        if old is None:
            continue
        holder = lock_holder(run_dir)
        if holder is not None:
            raise EvalInputError(f"checkpoint {run_dir}: {name}/ is being replaced right now by the training that owns "
                                 f"the folder ({describe_holder(holder)}); try again in a moment")
        try:
            recover_interrupted_swap(folder)
        except OSError as error:
            raise EvalInputError(f"checkpoint {run_dir}: {name}/ is missing and {old.name}/ holds the copy an "
                                 f"interrupted save left; it cannot be moved back ({first_line(error)}): rename "
                                 f"{old} to {folder}") from error
        print(f"note: {folder}: restored from {old.name}/ (a save of {name}/ was interrupted)", file=sys.stderr)


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A run folder (uses best/, else last/, after `recover_run_checkpoints`), a pair folder, or the Hub
    repo id of a pair (its cached snapshot; downloaded when online) -> Checkpoint; EvalInputError when
    none of these."""
    given = Path(path)
    if given.name in CHECKPOINT_DIRS and given.parent.is_dir():
        recover_run_checkpoints(given.parent)
    elif given.is_dir():
        recover_run_checkpoints(given)
    if not given.exists():
        try:
            snapshot = resolve_pretrained_folder(str(path))
        except FileNotFoundError:
            raise EvalInputError(f"checkpoint {given}: no such folder") from None
        except OSError as error:
            raise EvalInputError(f"checkpoint {first_line(error)}") from error
        return Checkpoint(str(path), given, snapshot, None)
    if not given.is_dir():
        raise EvalInputError(f"checkpoint {given}: not a folder (give a run folder or a saved ReciprocalPair folder)")
    if _looks_like_pair_dir(given):
        run_dir = given.parent if given.name in CHECKPOINT_DIRS else None
        name = f"{given.parent.name}/{given.name}" if run_dir is not None else given.name
        return Checkpoint(name, given, given, _read_run_config(run_dir) if run_dir is not None else None)
    chosen = selected_checkpoint(given)
    if chosen is not None:
        return Checkpoint(given.name, given, chosen, _read_run_config(given))
    raise EvalInputError(f"checkpoint {given}: neither a run folder (no best/ or last/) nor a pair folder "
                         f"({_pair_layout_hint()})")


def load_pair(checkpoint: Checkpoint):
    """modeling.ReciprocalPair.from_pretrained(checkpoint.pair_dir), errors as one-line EvalInputError; from a
    run folder, with its run record (`modeling.card.read_run_record`: config + results, for the card)."""
    missing = _missing_pair_files(checkpoint.pair_dir)
    if missing:
        raise EvalInputError(f"checkpoint {checkpoint.pair_dir}: missing {', '.join(missing)}")
    try:
        pair = modeling.ReciprocalPair.from_pretrained(checkpoint.pair_dir)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise EvalInputError(f"checkpoint {checkpoint.pair_dir}: cannot load ({first_line(error)})") from error
    if tuple(pair.a.image_size) != tuple(pair.b.image_size):
        raise EvalInputError(f"checkpoint {checkpoint.pair_dir}: models A and B take different image sizes "
                             f"({tuple(pair.a.image_size)} vs {tuple(pair.b.image_size)})")
    for member, model in zip(_pair_member_dirs(checkpoint.pair_dir), pair.models):
        text_config = model.clip.config.text_config
        if text_config.vocab_size < VOCAB_SIZE or text_config.max_position_embeddings < CONTEXT_LENGTH:
            raise EvalInputError(
                f"checkpoint {checkpoint.pair_dir}: {member}/{MODEL_CONFIG_NAME} has an incompatible text config "
                f"(vocab_size {text_config.vocab_size}, max_position_embeddings {text_config.max_position_embeddings}; "
                f"the CLIP tokenizer needs at least {VOCAB_SIZE} and {CONTEXT_LENGTH})")
    if checkpoint.run_config is not None:  # a run folder: its config and results, for the model card
        from trpr.modeling.card import read_run_record

        pair.run_record = read_run_record(checkpoint.pair_dir.parent)
    return pair


def load_eval_split(dataset: str, root: str | None, split: str):
    """(`<split>_gallery`, `<split>_queries`) of data.load_benchmark(dataset, root); EvalInputError on an
    unknown dataset, a missing or empty split, or unusable gallery images (`check_gallery_images`)."""
    try:
        splits = data.load_benchmark(dataset, root=root)
    except (OSError, ValueError, KeyError) as error:
        raise EvalInputError(f"dataset {dataset!r}: {first_line(error)}") from error
    gallery_key, queries_key = f"{split}_gallery", f"{split}_queries"
    if gallery_key not in splits or queries_key not in splits:
        available = sorted(key[: -len("_gallery")] for key in splits if key.endswith("_gallery"))
        raise EvalInputError(f"dataset {dataset!r}: no evaluation split {split!r} "
                             f"(available: {', '.join(available) or 'none'})")
    for key in (gallery_key, queries_key):
        if len(splits[key]) == 0:
            raise EvalInputError(f"dataset {dataset!r}: split {split!r} is empty ({key} has no rows)")
    check_gallery_images(splits[gallery_key], f"{dataset}/{gallery_key}")
    return splits[gallery_key], splits[queries_key]


def check_gallery_images(gallery_split, name: str) -> None:
    """Decode every gallery image once before any encoding (data.verify_images, parallel and cached):
    EvalInputError naming the first unusable file and how many there are (the full list on stderr)."""
    from trpr.data.images import ImageCheckError, image_check_summary

    try:
        data.verify_images(gallery_split, policy="error", name=name)
    except ImageCheckError as error:
        listing, headline, first = image_check_summary(error)
        print(listing, file=sys.stderr)
        raise EvalInputError(f"{headline}: cannot read image {first}") from None


@contextlib.contextmanager
def unreadable_images_as_input_errors():
    """A gallery image that cannot be read (data.EvalImages names the file) ends as a one-line error."""
    try:
        yield
    except OSError as error:
        raise EvalInputError(first_line(error)) from error
