"""Reciprocal pair of TRPRModels (docs/method.md §5), the retrieval rows and the features of their scores."""
from __future__ import annotations

import copy
import json
from pathlib import Path, PureWindowsPath
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trpr.configs.choices import MODEL_ROWS, ROW_KEYS, SCORES, parse_row_key, selection_rows  # noqa: F401

from .backbone import DEFAULT_CLIP
from .hub import HubMixin
from .model import CARD_NAME, TRPRModel, read_json_file

PAIR_CONFIG_NAME = "pair.json"
PAIR_TYPE = "3rtpr-pair"
MEMBER_DIRS = ("model_a", "model_b")
# Retrieval rows "<models>/<score>": the models A, B or their ensemble A+B, scored with GE (global
# embeddings), FS (fused) or GE+FS (both); image->text rows carry I2T_PREFIX. SCORES, MODEL_ROWS, ROW_KEYS and the
# row / select_row parsers live in configs.choices (configs validates eval.select_row, never imports modeling).
I2T_PREFIX = "i2t:"


class ReciprocalPair(nn.Module, HubMixin):
    """Two TRPRModels with the same architecture and backbone init and different head inits.
    `pair.a`, `pair.b`; each is trained with its own optimizer (engine.reciprocal_step).
    save_pretrained / from_pretrained (a folder or a Hub repo id) / push_to_hub: modeling.hub.HubMixin."""

    def __init__(self, model_a: TRPRModel, model_b: TRPRModel):
        super().__init__()
        self.a = model_a
        self.b = model_b
        # {"config", "results"} of the run that trained the pair (modeling.card): saved in pair.json,
        # the source of the generated model card; None = no record (the card then says so). Not an
        # __init__ argument: ModelHubMixin would then write its own config.json of the init arguments.
        self.run_record: dict | None = None

    @property
    def models(self) -> tuple[TRPRModel, TRPRModel]:
        """(a, b)."""
        return self.a, self.b

    @classmethod
    def from_clip(cls, name_or_path_or_config=DEFAULT_CLIP, head_seeds: tuple[int, int] = (0, 1),
                  **from_clip_kwargs) -> "ReciprocalPair":
        """Load the CLIP backbone once, copy it, and give each copy its own head init
        (`head_seeds`). `from_clip_kwargs` as `TRPRModel.from_clip` (select_ratio, fused_dim, ...)."""
        if len(head_seeds) != 2:
            raise ValueError(f"head_seeds must hold two seeds, got {head_seeds!r}")
        model_a = TRPRModel.from_clip(name_or_path_or_config, head_seed=head_seeds[0], **from_clip_kwargs)
        model_b = copy.deepcopy(model_a)
        model_b.reset_heads(head_seeds[1])
        return cls(model_a, model_b)

    def encode_image(self, pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(global, fused) of model a, (global, fused) of model b] for pixel_values [B, 3, H, W]."""
        return [self.a.encode_image(pixel_values), self.b.encode_image(pixel_values)]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(global, fused) of model a, (global, fused) of model b] for input_ids/attention_mask [B, L]."""
        return [self.a.encode_text(input_ids, attention_mask), self.b.encode_text(input_ids, attention_mask)]

    def _save_pretrained(self, save_directory: str | Path) -> None:
        """`model_a/` and `model_b/` (TRPRModel folders) + `pair.json` (with the run record, if any) + the
        model card generated from it (`modeling.card.model_card`)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, model in zip(MEMBER_DIRS, self.models):
            model.save_pretrained(directory / name)
        config = {"model_type": PAIR_TYPE, "members": list(MEMBER_DIRS)}
        if self.run_record:
            config["run"] = self.run_record
        (directory / PAIR_CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
        from .card import model_card

        model_card(self).save(directory / CARD_NAME)

    @classmethod
    def _load_folder(cls, directory: Path, map_location: str | torch.device = "cpu") -> "ReciprocalPair":
        """Load a local folder written by `save_pretrained` (safetensors only)."""
        config_path = directory / PAIR_CONFIG_NAME
        config = read_json_file(config_path, "ReciprocalPair")
        members = config.get("members")
        if config.get("model_type") != PAIR_TYPE or not isinstance(members, list) or len(members) != 2:
            raise ValueError(f"{config_path}: expected model_type {PAIR_TYPE!r} and two 'members', got {config!r}")
        for name in members:
            check_member_name(name, config_path)
        model_a, model_b = (TRPRModel._load_folder(directory / name, map_location) for name in members)
        pair = cls(model_a, model_b)
        run = config.get("run")
        pair.run_record = run if isinstance(run, dict) else None
        return pair


def check_member_name(name, config_path: Path) -> None:
    """A `members` entry of pair.json must name a folder inside the pair folder: one plain path component
    (not absolute, no `..`, no separator) that does not resolve (through a symlink) to a place outside it.
    ValueError naming the file and the entry otherwise (a pair folder from elsewhere must not load
    weights from anywhere else on the machine)."""
    directory = Path(config_path).parent
    plain = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
             and not PureWindowsPath(name).drive)
    if not plain or not (directory / name).resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"{config_path}: member {name!r} is not a folder inside the pair folder "
                         "(expected a plain folder name such as 'model_a')")


def selection_r1(metrics: dict, rule: str) -> float:
    """The R@1 (percent) a selection rule scores `metrics` ({row: {"R1": ...}}) with: its row's, or the
    best of its rows' for max(...)."""
    return max(metrics[row]["R1"] for row in selection_rows(rule))


def scoring_features(outputs: Sequence[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor],
                     score: str) -> torch.Tensor:
    """Retrieval features whose dot product is the requested score.

    outputs: [(global [N, E], fused [N, D]), ...] of one model, or of models a and b (ensemble A+B);
             a bare (global, fused) tuple of tensors means one model.
    score:   "GE" (global cosine), "FS" (fused cosine) or "GE+FS" (their sum).
    Returns float32 [N, K]: the concatenation of the L2-normalised chosen pieces over all models,
    so that q @ g.T == Σ_models Σ_pieces cos(·,·).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if len(outputs) == 2 and all(isinstance(piece, torch.Tensor) for piece in outputs):
        outputs = [outputs]  # a single (global, fused) tuple
    pieces = []
    for global_embedding, fused_embedding in outputs:
        if score in ("GE", "GE+FS"):
            pieces.append(F.normalize(global_embedding.float(), dim=-1))
        if score in ("FS", "GE+FS"):
            pieces.append(F.normalize(fused_embedding.float(), dim=-1))
    return torch.cat(pieces, dim=-1)
