"""Sharing checkpoints the way the Hugging Face ecosystem does (huggingface_hub's ModelHubMixin).

`TRPRModel` and `ReciprocalPair` inherit `HubMixin`:

    model = TRPRModel.from_pretrained("path/to/folder")               # a local folder
    pair = ReciprocalPair.from_pretrained("org/3rtpr-cuhk-pedes")     # a Hub repo id (cached; offline: the cache)
    pair.save_pretrained("folder")                                    # today's format: safetensors + JSON + card
    pair.push_to_hub("org/3rtpr-cuhk-pedes")                          # create the repo, upload the folder

The folder format is each class's own (`_save_pretrained` writes it, `_load_folder` reads it; nothing is
unpickled). `from_pretrained` resolves the name to a local folder first: an existing folder is used as
it is, anything else is taken as a Hub repo id and fetched with `huggingface_hub.snapshot_download`
(which reads the local Hub cache, $HF_HUB_CACHE, and nothing else under HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

LIBRARY_NAME = "3rtpr"
HUB_TAGS = ["text-based-person-retrieval", "clip", "3rtpr"]


def resolve_pretrained_folder(name_or_path: str | Path, *, revision: str | None = None,
                              cache_dir: str | Path | None = None, force_download: bool = False,
                              local_files_only: bool = False, token: str | bool | None = None) -> Path:
    """A local folder: `name_or_path` itself when it is a folder, else the snapshot of the Hub repo it
    names (downloaded into, or read from, the Hub cache). FileNotFoundError when it is neither an
    existing folder nor a valid repo id; OSError (naming the repo) when the repo cannot be fetched."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name_or_path}: not a folder")
    repo_id = str(name_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path}: no such folder (and not a Hugging Face Hub repo id)") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                   local_files_only=local_files_only, token=token, library_name=LIBRARY_NAME)
    except Exception as error:  # offline without a cached copy, unknown repo, no access, ...
        raise OSError(f"{name_or_path}: not a local folder, and Hub repo {repo_id!r} could not be fetched "
                      f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''})") from error
    return Path(folder)


class HubMixin(ModelHubMixin, library_name=LIBRARY_NAME, tags=HUB_TAGS):
    """from_pretrained (local folder or Hub repo id), save_pretrained and push_to_hub for a module whose
    subclass implements `_save_pretrained(folder)` and `_load_folder(folder, map_location)`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, map_location: str | torch.device = "cpu",
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        force_download: bool = False, local_files_only: bool = False,
                        token: str | bool | None = None):
        """Load from a local folder written by `save_pretrained`, or from the Hub repo `org/name`
        (`revision`: branch, tag or commit; `cache_dir`: default $HF_HUB_CACHE). Tensors go to
        `map_location`."""
        folder = resolve_pretrained_folder(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                           force_download=force_download, local_files_only=local_files_only,
                                           token=token)
        return cls._from_pretrained(model_id=str(folder), revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only, token=token,
                                    map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str | torch.device = "cpu", **model_kwargs):
        """ModelHubMixin's loading hook; `model_id` is already a local folder here."""
        return cls._load_folder(Path(model_id), map_location)

    @classmethod
    def _load_folder(cls, folder: Path, map_location: str | torch.device):
        raise NotImplementedError

    def _save_pretrained(self, save_directory: Path) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------- a pretrained CLIP backbone, checked early
CLIP_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")
HUB_PROBE_TIMEOUT_S = 3.0


def _save_locally_hint(name: str) -> str:
    return ("on a connected machine run  python -c \"from transformers import CLIPModel; "
            f"CLIPModel.from_pretrained('{name}').save_pretrained('DIR')\"  then copy DIR here and pass "
            "--model.backbone DIR")


def check_pretrained_clip(name_or_path: str | Path, *, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Fail fast, before any work, when `transformers.CLIPModel.from_pretrained(name_or_path)` cannot
    succeed: a local folder must hold config.json and weights; a Hub model id must be in the Hugging Face
    cache ($HF_HUB_CACHE), or (not offline) the Hub must answer a TCP connection within `timeout_s`
    seconds: no retries. Under HF_HUB_OFFLINE=1 the network is never touched. OSError with one actionable
    line (naming --model.backbone DIR and how to make DIR) otherwise."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a folder (give a CLIP model folder saved by transformers)")
        missing = [name for name in ("config.json",) if not (path / name).is_file()]
        if not any((path / name).is_file() for name in CLIP_WEIGHT_FILES):
            missing.append(" or ".join(CLIP_WEIGHT_FILES[::2]))
        if missing:
            raise FileNotFoundError(f"folder {path} lacks {', '.join(missing)}: not a model saved by transformers; "
                                    + _save_locally_hint("openai/clip-vit-base-patch16"))
        return
    repo_id = str(name_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path}: no such folder (and not a Hugging Face Hub model id); give a "
                                "CLIP model folder: " + _save_locally_hint("openai/clip-vit-base-patch16")) from None
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: transformers loads it (also offline)
    where = f"neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.is_offline_mode():
        raise OSError(f"{repo_id} is {where} and HF_HUB_OFFLINE is set; " + _save_locally_hint(repo_id))
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as error:
        raise OSError(f"{repo_id} is {where} and {constants.ENDPOINT} cannot be reached ({error}); "
                      + _save_locally_hint(repo_id)) from None
