"""CLIP dual encoder at a non-square image size (docs/method.md §1).

The parameters are the `transformers` CLIP parts (`vision_model`, `text_model`, `visual_projection`,
`text_projection`, with their HF names) so that any CLIP checkpoint loads unchanged; the forward
pass (embeddings, `SDPAEncoderLayer`, final norms, projections) is written here because

* HF's vision embeddings only accept the square image size of the config, while we run 384×128;
* the fused heads need the head-averaged attention row of the CLS / EOT query of the LAST layer,
  and we want every layer to keep `F.scaled_dot_product_attention` (flash / memory-efficient
  kernels) instead of switching the whole encoder to eager attention. The row is computed from the
  last layer's own `layer_norm1 -> q_proj / k_proj` outputs (the same q and k its SDPA call uses).

Text uses the causal mask only: captions are right-padded (`SOT w1 .. wn EOT 0 0 ..`), so causality
already hides every padding key from every real query (padding positions' own outputs differ from
a padding-masked run, but nothing reads them). `encode_text` checks the right-padding layout.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPConfig, CLIPModel

DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class EncoderOutput(NamedTuple):
    """What one encoder returns.

    tokens:        [B, L, E] every token after the final LayerNorm, projected to the joint space
                   (E = projection_dim). Image: L = 1 + N_patches, CLS first. Text: L = input length.
    attention_row: [B, L] float32, last layer's attention of the CLS (image) / EOT (text) query over
                   all L keys, averaged over heads; each row sums to 1 (text: zero after EOT).
    global_index:  [B] int64 position of the global token (0 for images, EOT for text).
    """

    tokens: torch.Tensor
    attention_row: torch.Tensor
    global_index: torch.Tensor

    @property
    def global_embedding(self) -> torch.Tensor:
        """[B, E] the projected CLS / EOT token (un-normalised)."""
        batch = torch.arange(self.tokens.shape[0], device=self.tokens.device)
        return self.tokens[batch, self.global_index]


def resize_position_embedding(weight: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resize square ViT position embeddings to another patch grid (bilinear, CLS kept).

    weight:  [1 + G*G, C] with the CLS position first and the patch positions row-major on a G×G grid.
    grid_hw: (h, w) target grid in patches (rows = image height / patch).
    Returns [1 + h*w, C] (same dtype), patch positions row-major, like the conv's flattened output.
    Bilinear with align_corners=False (half-pixel centres), the convention of `F.interpolate`.
    """
    num_patches = weight.shape[0] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"position embedding has {num_patches} patch positions, not a square grid")
    height, width = grid_hw
    cls_pos, patch_pos = weight[:1], weight[1:]
    if (side, side) == (height, width):
        return weight.clone()
    grid = patch_pos.float().reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0)  # [1, C, G, G]
    resized = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    resized = resized.squeeze(0).permute(1, 2, 0).reshape(height * width, -1).to(weight.dtype)
    return torch.cat([cls_pos, resized], dim=0)


def head_averaged_attention_row(queries: torch.Tensor, keys: torch.Tensor, query_index: torch.Tensor,
                                scale: float, causal: bool) -> torch.Tensor:
    """Attention probabilities of one query per sample, averaged over heads.

    queries, keys: [B, H, L, Dh] (per-head q and k of one layer).
    query_index:   [B] int64, the query position of each sample.
    causal:        mask keys after the query (text); padding sits after EOT so it is masked too.
    Returns [B, L] float32 (softmax in fp32, like HF's eager attention).
    """
    batch, heads, length, head_dim = queries.shape
    gather_index = query_index.view(batch, 1, 1, 1).expand(batch, heads, 1, head_dim)
    with torch.autocast(queries.device.type, enabled=False):  # fp32 scores even under bf16 autocast
        query = queries.gather(2, gather_index).float()  # [B, H, 1, Dh]
        logits = (query @ keys.float().transpose(-1, -2)).squeeze(2) * scale  # [B, H, L]
    if causal:
        positions = torch.arange(length, device=logits.device)
        hidden = positions.view(1, 1, length) > query_index.view(batch, 1, 1)
        logits = logits.masked_fill(hidden, float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def load_clip_model(source: str | Path | CLIPConfig | dict | None) -> CLIPModel:
    """A `transformers.CLIPModel` from a hub name / local directory (pretrained weights, SDPA attention)
    or from a `CLIPConfig` / config dict (random init). None means `openai/clip-vit-base-patch16`."""
    if source is None:
        source = DEFAULT_CLIP
    if isinstance(source, dict):
        source = CLIPConfig.from_dict(source)
    if isinstance(source, CLIPConfig):
        return CLIPModel(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a CLIP model directory (no config.json)")
        if not path.exists() and (path.is_absolute() or str(source).startswith((".", "~"))
                                  or str(source).count("/") > 1):
            raise FileNotFoundError(f"{path}: no such CLIP model directory")
        try:
            model = CLIPModel.from_pretrained(str(source), attn_implementation="sdpa")
        except OSError as error:
            raise OSError(f"could not load CLIP weights {str(source)!r} ({error}). Offline? Pass a local "
                          f"directory saved by transformers, or a CLIPConfig for random init.") from error
        return model.float()  # fp32 master weights whatever the checkpoint's dtype (use autocast for bf16)
    raise TypeError(f"CLIP source must be a hub name, a directory, a CLIPConfig or a dict, got {type(source)!r}")


class SDPAEncoderLayer(nn.Module):
    """A CLIP pre-LN encoder layer run with `F.scaled_dot_product_attention`.

    Adopts the submodules of a `transformers` CLIPEncoderLayer (`self_attn.{q,k,v,out}_proj`,
    `layer_norm1`, `mlp`, `layer_norm2`), so parameter names and checkpoints are unchanged; only the
    forward is ours (it can also return the attention row of one query). This is the unit to wrap
    for FSDP (`fsdp_transformer_layer_cls_to_wrap: SDPAEncoderLayer`) and for activation checkpointing.
    """

    def __init__(self, clip_layer: nn.Module):
        super().__init__()
        self.self_attn = clip_layer.self_attn
        self.layer_norm1 = clip_layer.layer_norm1
        self.mlp = clip_layer.mlp
        self.layer_norm2 = clip_layer.layer_norm2
        self.num_heads = self.self_attn.num_heads
        self.head_dim = self.self_attn.head_dim
        self.scale = float(self.self_attn.scale)
        self.attention_dropout = float(self.self_attn.dropout)

    def forward(self, hidden: torch.Tensor, causal: bool = False, query_index: torch.Tensor | None = None):
        """hidden [B, L, C] -> [B, L, C]; with query_index [B] also returns the head-averaged attention
        row [B, L] float32 of that query (no gradient), from this layer's own q and k."""
        attention = self.self_attn
        batch, length, _ = hidden.shape
        normed = self.layer_norm1(hidden)
        shape = (batch, length, self.num_heads, self.head_dim)
        queries = attention.q_proj(normed).view(shape).transpose(1, 2)
        keys = attention.k_proj(normed).view(shape).transpose(1, 2)
        values = attention.v_proj(normed).view(shape).transpose(1, 2)
        dropout = self.attention_dropout if self.training else 0.0
        mixed = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout, is_causal=causal,
                                               scale=self.scale)
        hidden = hidden + attention.out_proj(mixed.transpose(1, 2).reshape(batch, length, -1))
        hidden = hidden + self.mlp(self.layer_norm2(hidden))
        if query_index is None:
            return hidden
        row = head_averaged_attention_row(queries.detach(), keys.detach(), query_index, self.scale, causal)
        return hidden, row


class CLIPBackbone(nn.Module):
    """CLIP image and text encoders with projections (parameters keep HF names, no logit scale).

    image_size: (H, W) in pixels, each divisible by the patch size; the position embeddings are
    resized ONCE here to the (H/p)×(W/p) grid and stored as the parameter
    `vision_model.embeddings.position_embedding.weight` [1 + N_patches, C_vision].
    The patch-embedding convolution is frozen.
    """

    def __init__(self, clip_model: CLIPModel, image_size: tuple[int, int] = (384, 128)):
        super().__init__()
        self.config: CLIPConfig = clip_model.config
        self.vision_model = clip_model.vision_model
        self.text_model = clip_model.text_model
        self.visual_projection = clip_model.visual_projection
        self.text_projection = clip_model.text_projection
        patch = self.config.vision_config.patch_size
        height, width = (int(s) for s in image_size)
        if height % patch or width % patch or height <= 0 or width <= 0:
            raise ValueError(f"image_size {image_size} must be positive multiples of the patch size {patch}")
        self.image_size = (height, width)
        self.grid_size = (height // patch, width // patch)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.max_text_length = self.config.text_config.max_position_embeddings
        self.gradient_checkpointing = False
        # encode_text's right-padding check reads the mask back (a host sync per call on a GPU); the training
        # engine checks its batches on the host before the copy (engine.batch.text_lengths) and turns it off
        self.check_text_padding = True
        self._install_position_embedding()
        self._install_sdpa_layers()
        self.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)

    def _install_sdpa_layers(self) -> None:
        for encoder in (self.vision_model.encoder, self.text_model.encoder):
            encoder.layers = nn.ModuleList(SDPAEncoderLayer(layer) for layer in encoder.layers)

    def _install_position_embedding(self) -> None:
        embeddings = self.vision_model.embeddings
        old = embeddings.position_embedding.weight
        vision = self.config.vision_config
        native = (vision.image_size // vision.patch_size) ** 2
        if old.shape[0] != 1 + native:
            raise ValueError(f"vision position embedding has {old.shape[0]} rows, expected 1 + {native} "
                             f"for the config's {vision.image_size}px square input")
        with torch.no_grad():
            resized = resize_position_embedding(old.detach(), self.grid_size)
        new = nn.Embedding(resized.shape[0], resized.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            new.weight.copy_(resized)
        embeddings.position_embedding = new
        # keep HF's bookkeeping consistent with the new grid (not used by our forward)
        embeddings.num_patches = self.num_patches
        embeddings.num_positions = 1 + self.num_patches
        embeddings.position_ids = torch.arange(1 + self.num_patches, device=old.device).unsqueeze(0)

    def _run_layers(self, layers: nn.ModuleList, hidden: torch.Tensor, causal: bool,
                    query_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All encoder layers; the last one also yields the attention row of `query_index`."""
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        last = len(layers) - 1
        row = None
        for i, layer in enumerate(layers):
            index = query_index if i == last else None
            if use_checkpoint:
                result = checkpoint(layer, hidden, causal, index, use_reentrant=False)
            else:
                result = layer(hidden, causal, index)
            if i == last:
                hidden, row = result
            else:
                hidden = result
        return hidden, row

    # --------------------------------------------------------------------------------------- encoders
    def encode_image(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """pixel_values [B, 3, H, W] (CLIP-normalised, H×W = image_size) -> EncoderOutput with
        tokens [B, 1 + N_patches, E] (CLS first, patches row-major) and the CLS attention row."""
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"pixel_values must be [B, 3, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {list(pixel_values.shape)}")
        embeddings = self.vision_model.embeddings
        conv = embeddings.patch_embedding
        patches = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        batch = patches.shape[0]
        cls = embeddings.class_embedding.to(patches.dtype).expand(batch, 1, -1)
        hidden = torch.cat([cls, patches], dim=1) + embeddings.position_embedding.weight.to(patches.dtype)
        hidden = self.vision_model.pre_layrnorm(hidden)
        query_index = torch.zeros(batch, dtype=torch.long, device=hidden.device)
        hidden, row = self._run_layers(self.vision_model.encoder.layers, hidden, False, query_index)
        tokens = self.visual_projection(self.vision_model.post_layernorm(hidden))
        return EncoderOutput(tokens, row, query_index)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        """input_ids, attention_mask [B, L] (L <= 77; right-padded `SOT w.. EOT 0..`) -> EncoderOutput
        with tokens [B, L, E] and the EOT attention row; EOT position = attention_mask.sum(-1) - 1."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, L], got {list(input_ids.shape)} "
                             f"and {list(attention_mask.shape)}")
        length = input_ids.shape[1]
        if length > self.max_text_length:
            raise ValueError(f"text length {length} exceeds the model's {self.max_text_length} positions")
        lengths = attention_mask.long().sum(dim=-1)
        if self.check_text_padding and not torch.compiler.is_compiling():
            positions = torch.arange(length, device=attention_mask.device)
            right_padded = (attention_mask.long() == (positions < lengths[:, None]).long()).all()
            if not bool(right_padded) or bool((lengths < 2).any()):
                raise ValueError("attention_mask must be right-padded (ones then zeros) with at least SOT and EOT "
                                 "in every row")
        eot_index = lengths - 1
        embeddings = self.text_model.embeddings
        hidden = embeddings.token_embedding(input_ids) + embeddings.position_embedding.weight[:length]
        hidden, row = self._run_layers(self.text_model.encoder.layers, hidden, True, eot_index)
        tokens = self.text_projection(self.text_model.final_layer_norm(hidden))
        return EncoderOutput(tokens, row, eot_index)
