"""Training state files that cannot carry code: one safetensors file per state object.

A state object (an optimizer / scheduler / scaler state dict, the ALR state, a process's RNG state) is a
nest of dicts, lists, tuples, tensors, NumPy arrays and plain scalars. `save_state` stores its tensors in
a safetensors file and the nest itself, with every tensor replaced by a reference, as JSON in the file's
metadata (key `trpr.state`). `load_state` reads both back: safetensors holds raw tensor bytes and JSON
holds data only, so a planted file can at worst be refused, never run anything (torch.load / pickle are
never used on a run folder; see docs/decisions.md, "Reliability III").

JSON forms besides plain JSON values (their `$` keys cannot clash with a plain dict's: a dict whose keys
are not all strings, or that has a key starting with `$`, is stored as a `$dict` list of pairs):

    {"$tensor": "<name in the safetensors file>"}
    {"$ndarray": {"dtype": "uint32", "shape": [624], "data": [...]}}
    {"$tuple": [...]}
    {"$dict": [[key, value], ...]}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

STATE_SUFFIX = ".safetensors"
METADATA_KEY = "trpr.state"
_FORMS = ("$tensor", "$ndarray", "$tuple", "$dict")


class StateFileError(ValueError):
    """A state file that is missing, damaged or not in this format; the message is one line naming it."""


def _encode(value, tensors: dict, where: str):
    """The JSON form of `value`; its tensors go into `tensors` under fresh names."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{where}: NumPy arrays of Python objects cannot be stored")
        return {"$ndarray": {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.ravel().tolist()}}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
        return {"$dict": [[_encode(key, tensors, f"{where} key"), _encode(item, tensors, f"{where}[{key!r}]")]
                          for key, item in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a state file")


def _decode(value, tensors: dict, where: str):
    """The inverse of `_encode`; anything outside the forms above is a ValueError naming its place."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, dict):
        raise ValueError(f"{where}: unexpected {type(value).__name__}")
    form = next((key for key in value if key in _FORMS), None)
    if form is None:
        return {key: _decode(item, tensors, f"{where}.{key}") for key, item in value.items()}
    if len(value) != 1:
        raise ValueError(f"{where}: {form} entry with other keys")
    body = value[form]
    if form == "$tensor":
        if not isinstance(body, str) or body not in tensors:
            raise ValueError(f"{where}: refers to tensor {body!r}, which the file does not hold")
        return tensors[body]
    if form == "$ndarray":
        if not isinstance(body, dict) or set(body) != {"dtype", "shape", "data"}:
            raise ValueError(f"{where}: malformed $ndarray")
        dtype = np.dtype(body["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"{where}: $ndarray of dtype {dtype} is not allowed")
        return np.asarray(body["data"], dtype=dtype).reshape(body["shape"])
    if not isinstance(body, list):
        raise ValueError(f"{where}: malformed {form}")
    if form == "$tuple":
        return tuple(_decode(item, tensors, f"{where}[{i}]") for i, item in enumerate(body))
    pairs = {}
    for pair in body:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"{where}: malformed $dict entry")
        key = _decode(pair[0], tensors, f"{where} key")
        if isinstance(key, list):
            raise ValueError(f"{where}: a list cannot be a dict key")
        pairs[key] = _decode(pair[1], tensors, f"{where}[{key!r}]")
    return pairs


def state_path(folder: str | Path, name: str) -> Path:
    """`<folder>/<name>.safetensors`: where `save_state` keeps the state called `name`."""
    return Path(folder) / f"{name}{STATE_SUFFIX}"


def save_state(state, path: str | Path) -> None:
    """Write `state` (dicts, lists, tuples, tensors, NumPy arrays, numbers, strings, None) to `path`
    (a .safetensors file). TypeError naming the place of a value of another type."""
    from safetensors.torch import save_file

    tensors: dict = {}
    structure = _encode(state, tensors, "state")
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(structure)})


def load_state(path: str | Path):
    """The state `save_state` wrote to `path`. StateFileError (one line naming the file) when it is
    missing, not a safetensors file of this format (e.g. a pickle) or damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises SafetensorError / OSError / ValueError on foreign bytes
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StateFileError(f"{path}: not a training-state file of this format, or damaged ({message})") from None
    if METADATA_KEY not in metadata:
        raise StateFileError(f"{path}: a safetensors file without the {METADATA_KEY!r} metadata of a training state")
    try:
        return _decode(json.loads(metadata[METADATA_KEY]), tensors, "state")
    except (ValueError, TypeError) as error:
        raise StateFileError(f"{path}: malformed training state ({error})") from None
