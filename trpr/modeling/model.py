"""TRPRModel: CLIP backbone + the two fused heads of 3RTPR (docs/method.md §1–§2), with a Hub checkpoint
format (safetensors weights + JSON config + model card; loading never unpickles) shared through
`modeling.hub.HubMixin` (from_pretrained from a folder or a Hub repo id, push_to_hub)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig

from .backbone import DEFAULT_CLIP, CLIPBackbone, load_clip_model
from .fused import IMAGE_TOKEN_MODES, ImageFusedHead, TextFusedHead, select_text_tokens, top_patch_indices
from .hub import HubMixin

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MODEL_TYPE = "3rtpr"
FORMAT_VERSION = 1


class TRPRModel(nn.Module, HubMixin):
    """Dual encoder returning (global, fused) embeddings for images and captions.

    Parameters named `clip.*` are the backbone; `image_head.*` / `text_head.*` are the fused heads
    (absent when select_ratio == 0: then fused == global).
    E = CLIP projection_dim (512 for ViT-B/16); D = fused_dim, or E when select_ratio == 0.
    """

    def __init__(self, backbone: CLIPBackbone, select_ratio: float = 0.2, fused_dim: int = 2048,
                 image_tokens: str = "all", head_seed: int | None = None):
        super().__init__()
        if not 0.0 <= float(select_ratio) <= 1.0:
            raise ValueError(f"select_ratio must be in [0, 1], got {select_ratio}")
        if image_tokens not in IMAGE_TOKEN_MODES:
            raise ValueError(f"image_tokens must be one of {IMAGE_TOKEN_MODES}, got {image_tokens!r}")
        self.clip = backbone
        self.select_ratio = float(select_ratio)
        self.fused_dim = int(fused_dim)
        self.image_tokens = image_tokens
        self.embed_dim = backbone.config.projection_dim
        self.image_head: ImageFusedHead | None = None
        self.text_head: TextFusedHead | None = None
        self.reset_heads(head_seed)

    # ---------------------------------------------------------------------------------- construction
    @classmethod
    def from_clip(cls, name_or_path_or_config: str | Path | CLIPConfig | dict | None = DEFAULT_CLIP,
                  select_ratio: float = 0.2, fused_dim: int = 2048, image_size: tuple[int, int] = (384, 128),
                  image_tokens: str = "all", head_seed: int | None = None) -> "TRPRModel":
        """Build from a CLIP hub name / local CLIP directory (pretrained, SDPA) or a CLIPConfig / dict
        (random init). The position embeddings are resized to `image_size` (H, W) here, once."""
        backbone = CLIPBackbone(load_clip_model(name_or_path_or_config), image_size)
        return cls(backbone, select_ratio, fused_dim, image_tokens, head_seed)

    def reset_heads(self, seed: int | None = None) -> None:
        """(Re)initialise the fused heads; with `seed`, from torch.manual_seed(seed) without touching
        the global RNG state (the backbone is unchanged)."""
        if self.select_ratio == 0:
            self.image_head = self.text_head = None
            return
        device = next(self.clip.parameters()).device
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.image_head = ImageFusedHead(self.embed_dim, self.fused_dim, self.clip.num_patches,
                                             self.select_ratio, self.image_tokens).to(device)
            self.text_head = TextFusedHead(self.embed_dim, self.fused_dim, self.clip.max_text_length - 2,
                                           self.select_ratio).to(device)

    @property
    def output_dim(self) -> int:
        """Width of the fused embedding: fused_dim, or E when select_ratio == 0."""
        return self.fused_dim if self.image_head is not None else self.embed_dim

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels the model takes."""
        return self.clip.image_size

    def settings(self) -> dict:
        """The JSON-serialisable settings a checkpoint stores next to the CLIP config."""
        return {"select_ratio": self.select_ratio, "fused_dim": self.fused_dim,
                "image_size": list(self.clip.image_size), "image_tokens": self.image_tokens}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute backbone layer activations in the backward pass (training memory ↓, time ↑)."""
        self.clip.gradient_checkpointing = bool(enabled)

    # -------------------------------------------------------------------------------------- encoders
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B, 3, H, W] -> (global [B, E], fused [B, D]), un-normalised, float32."""
        out = self.clip.encode_image(pixel_values)
        global_embedding = out.tokens[:, 0].float()
        if self.image_head is None:
            return global_embedding, global_embedding
        return global_embedding, self.image_head(out.tokens, out.attention_row).float()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, L] (right-padded, EOT at attention_mask.sum(-1) - 1)
        -> (global [B, E], fused [B, D]), un-normalised, float32."""
        out = self.clip.encode_text(input_ids, attention_mask)
        global_embedding = out.global_embedding.float()
        if self.text_head is None:
            return global_embedding, global_embedding
        return global_embedding, self.text_head(out.tokens, out.attention_row, out.global_index).float()

    # ---------------------------------------------------------------------------------- explanations
    @torch.no_grad()
    def explain_image(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """pixel_values [B, 3, H, W] -> [B, k] int64: the patches the image fused head pools (row-major
        positions in the patch grid of `patch_grid()`, most attended first), computed exactly as in
        `encode_image`; None when the head pools every patch (image_tokens "all" or "reference") or there is
        no head."""
        if self.image_head is None or self.image_head.image_tokens != "topk":
            return None
        out = self.clip.encode_image(pixel_values)
        return top_patch_indices(out.attention_row[:, 1:], self.image_head.k)

    @torch.no_grad()
    def explain_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """input_ids, attention_mask [B, L] -> (index [B, k'] int64, valid [B, k'] bool): the token positions
        the text fused head pools (index[i][valid[i]]), computed exactly as in `encode_text`; None without
        a head."""
        if self.text_head is None:
            return None
        out = self.clip.encode_text(input_ids, attention_mask)
        _, valid, index = select_text_tokens(out.tokens, out.attention_row, out.global_index, self.text_head.k)
        return index, valid

    def patch_grid(self) -> tuple[int, int, int]:
        """(rows, columns, patch size in pixels) of the image patch grid."""
        patch = self.clip.config.vision_config.patch_size
        height, width = self.clip.image_size
        return height // patch, width // patch, patch

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Either or both modalities in one call (what DDP / Accelerate wrappers call).
        Returns {"image_global", "image_fused"} and/or {"text_global", "text_fused"}."""
        outputs: dict[str, torch.Tensor] = {}
        if pixel_values is not None:
            outputs["image_global"], outputs["image_fused"] = self.encode_image(pixel_values)
        if input_ids is not None:
            if attention_mask is None:
                raise ValueError("input_ids given without attention_mask")
            outputs["text_global"], outputs["text_fused"] = self.encode_text(input_ids, attention_mask)
        if not outputs:
            raise ValueError("give pixel_values and/or input_ids + attention_mask")
        return outputs

    # ----------------------------------------------------------------------------------- checkpoints
    # save_pretrained(folder, push_to_hub=False, repo_id=None), push_to_hub(repo_id) and
    # from_pretrained(folder or repo id, map_location="cpu", revision=None, ...) come from HubMixin.
    def _save_pretrained(self, save_directory: str | Path) -> None:
        """Write `model.safetensors`, `config.json` (CLIP config + head settings) and a model card."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"model_type": MODEL_TYPE, "architectures": ["TRPRModel"], "format_version": FORMAT_VERSION,
                  **self.settings(), "clip_config": self.clip.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (directory / CARD_NAME).write_text(model_card(self))

    @classmethod
    def _load_folder(cls, directory: Path, map_location: str | torch.device = "cpu") -> "TRPRModel":
        """Load a local folder written by `save_pretrained` (safetensors only; nothing is unpickled)."""
        config = read_model_config(directory / CONFIG_NAME)
        clip_config = CLIPConfig.from_dict(config["clip_config"])
        with torch.device("meta"):  # shapes only: every persistent tensor comes from the weights file
            backbone = CLIPBackbone(load_clip_model(clip_config), tuple(config["image_size"]))
            model = cls(backbone, config["select_ratio"], config["fused_dim"], config["image_tokens"])
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: missing (expected the safetensors weights)")
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except SafetensorError as error:  # truncated / corrupt file: name it (SafetensorError is no OSError)
            raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from error
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = [f"{name} {list(state[name].shape)} != {list(tensor.shape)}"
                       for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
        if missing or unexpected or wrong_shape:
            raise ValueError(f"{weights_path}: does not match config.json (missing: {missing[:5]}, "
                             f"unexpected: {unexpected[:5]}, wrong shape: {wrong_shape[:5]})")
        model.load_state_dict(state, assign=True)
        _materialise_position_ids(model, torch.device(map_location))
        return model


def _materialise_position_ids(model: nn.Module, device: torch.device) -> None:
    """Re-create the non-persistent `position_ids` buffers (0..n-1) that a meta-device build left empty."""
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} is not in the checkpoint and cannot be rebuilt")
        owner_name, _, leaf = name.rpartition(".")
        values = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape).clone()
        setattr(model.get_submodule(owner_name), leaf, values)


def read_json_file(path: Path, what: str) -> dict:
    """The JSON object in `path`; a missing file or bad JSON raises an error naming the file (`what`: the
    kind of folder it should belong to, for the message)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a {what} folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def read_model_config(path: Path) -> dict:
    """Parse and check a TRPRModel `config.json`; errors name the file and the bad entry."""
    config = read_json_file(path, "TRPRModel checkpoint")
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}")
    version = config.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is newer than this trpr reads ({FORMAT_VERSION}); "
                         "upgrade trpr to load it")
    for key, kind in (("select_ratio", (int, float)), ("fused_dim", int), ("image_size", list),
                      ("image_tokens", str), ("clip_config", dict)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{path}: entry {key!r} is missing or has the wrong type ({config.get(key)!r})")
    if len(config["image_size"]) != 2:
        raise ValueError(f"{path}: entry 'image_size' must be [H, W], got {config['image_size']}")
    return config


def count_parameters(model: TRPRModel) -> dict[str, int]:
    """{"backbone", "heads", "trainable", "total"} parameter counts (trainable excludes the frozen conv)."""
    backbone = sum(p.numel() for n, p in model.named_parameters() if n.startswith("clip."))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"backbone": backbone, "heads": total - backbone, "trainable": trainable, "total": total}


def model_card(model: TRPRModel) -> str:
    """A short Hub model card (YAML front matter + usage) for a saved TRPRModel."""
    counts = count_parameters(model)
    height, width = model.clip.image_size
    clip = model.clip.config
    return (
        "---\n"
        "library_name: 3rtpr\n"
        "tags:\n- text-based-person-retrieval\n- clip\n- 3rtpr\n"
        "---\n\n"
        "# 3RTPR model\n\n"
        "CLIP dual encoder with fused representations for text-based person retrieval (3RTPR, TIP 2025).\n\n"
        f"- image input: {height}×{width} pixels, patch {clip.vision_config.patch_size}, "
        f"{clip.vision_config.num_hidden_layers} vision / {clip.text_config.num_hidden_layers} text layers, "
        f"joint width {clip.projection_dim}\n"
        f"- fused heads: select_ratio {model.select_ratio}, fused_dim {model.fused_dim}, "
        f"image_tokens {model.image_tokens}\n"
        f"- parameters: backbone {counts['backbone']:,}, heads {counts['heads']:,}\n\n"
        "```python\n"
        "from trpr.modeling import TRPRModel\n"
        "model = TRPRModel.from_pretrained(\"this-folder\")\n"
        "global_img, fused_img = model.encode_image(pixel_values)            # [B, 3, H, W]\n"
        "global_txt, fused_txt = model.encode_text(input_ids, attention_mask)  # [B, 77]\n"
        "```\n\n"
        "Scores: GE = cos(global_t, global_v), FS = cos(fused_t, fused_v), GE+FS = their sum.\n"
    )
