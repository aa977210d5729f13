"""Fused representation heads (docs/method.md §2).

For each modality: pick the k tokens with the highest last-layer attention from the CLS / EOT query,
L2-normalise each, pass them through MLP E -> D/2 -> BatchNorm1d -> ReLU -> D, max-pool over the
selected tokens (m), and add a linear projection of the un-normalised global embedding:
f = m + W g + b.

Text rows select a different number of tokens (k_i = min(k, real word count)); this is handled
with a fixed k and a validity mask, so shapes stay static (torch.compile friendly) and the
BatchNorm statistics only see real selected tokens (`MaskedBatchNorm1d`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# the image_tokens choices (topk | all | reference) live in configs.choices, with the meaning of each
from trpr.configs.choices import IMAGE_TOKEN_MODES  # noqa: F401 - also modeling.fused.IMAGE_TOKEN_MODES


def num_selected(num_candidates: int, select_ratio: float) -> int:
    """k = floor(num_candidates · ρ), at least 1 when ρ > 0 (a tiny grid must still pool something)."""
    if select_ratio <= 0:
        return 0
    return max(1, math.floor(num_candidates * select_ratio + 1e-9))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the tokens of a [B, K, C] tensor, counting only valid tokens, with an injectable
    reduction of its batch statistics (for statistics that span several processes).

    Same parameters, buffers and state_dict keys as `nn.BatchNorm1d(C)`. Without a mask it is exactly
    BatchNorm1d over the B·K tokens. With `valid` [B, K] bool, batch statistics (training) are the
    mean / biased variance over valid tokens; running statistics get the unbiased variance, as in
    PyTorch. Statistics are computed in float32.

    `reduce_statistics` (None = this process only): a differentiable function that maps this
    process's sums ([C + 1]: Σ values and the token count; then [C]: Σ squared deviations) to the sums
    over every process, e.g. `modeling.collectives.all_reduce_sum` (`engine.distributed.sync_batch_norms`
    sets it). It is used in training mode only; eval mode uses the running statistics as usual.
    """

    def __init__(self, *args, reduce_statistics: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reduce_statistics = reduce_statistics

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        batch, count, channels = tokens.shape
        reduce = self.reduce_statistics if self.training else None
        if valid is None and reduce is None:
            return super().forward(tokens.reshape(batch * count, channels)).view(batch, count, channels)
        values = tokens.float()
        if self.training or not self.track_running_stats:
            if valid is None:
                valid = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
            weight = valid.to(values.dtype).unsqueeze(-1)  # [B, K, 1]
            sums = torch.cat([(values * weight).sum(dim=(0, 1)), weight.sum().reshape(1)])
            if reduce is not None:
                sums = reduce(sums)
            total = sums[-1]
            denominator = total.clamp(min=1.0)
            mean = sums[:-1] / denominator
            squares = (((values - mean) ** 2) * weight).sum(dim=(0, 1))
            if reduce is not None:
                squares = reduce(squares)
            variance = squares / denominator
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, variance, total)
        else:
            mean, variance = self.running_mean, self.running_var
        normed = (values - mean) * torch.rsqrt(variance + self.eps)
        if self.affine:
            normed = normed * self.weight + self.bias
        return normed.to(tokens.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor, total: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.float()
        else:
            factor = self.momentum
        unbiased = variance * total / (total - 1).clamp(min=1.0)
        self.running_mean.mul_(1 - factor).add_(factor * mean)
        self.running_var.mul_(1 - factor).add_(factor * unbiased)


class FusedHead(nn.Module):
    """Token MLP + max-pool + projected global embedding (one per modality).

    embed_dim E: joint-space width of the tokens; fused_dim D: output width (even).
    Parameters: `token_fc1` (E -> D/2), `token_norm` (BatchNorm over D/2), `token_fc2` (D/2 -> D),
    `global_proj` (E -> D, with bias).
    """

    def __init__(self, embed_dim: int, fused_dim: int):
        super().__init__()
        if fused_dim < 2 or fused_dim % 2:
            raise ValueError(f"fused_dim must be an even number >= 2, got {fused_dim}")
        self.token_fc1 = nn.Linear(embed_dim, fused_dim // 2)
        self.token_norm = MaskedBatchNorm1d(fused_dim // 2)
        self.token_fc2 = nn.Linear(fused_dim // 2, fused_dim)
        self.global_proj = nn.Linear(embed_dim, fused_dim)

    def fuse(self, tokens: torch.Tensor, global_embedding: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, K, E] (selected), global_embedding [B, E], valid [B, K] bool or None (all valid)
        -> fused [B, D]. A row with no valid token gets m = 0 (f = W g + b)."""
        hidden = self.token_fc1(F.normalize(tokens, dim=-1))
        hidden = F.relu(self.token_norm(hidden, valid))
        hidden = self.token_fc2(hidden)  # [B, K, D]
        if valid is None:
            pooled = hidden.amax(dim=1)
        else:
            masked = hidden.masked_fill(~valid.unsqueeze(-1), float("-inf"))
            pooled = masked.amax(dim=1)
            pooled = torch.where(valid.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
        return pooled + self.global_proj(global_embedding)


def top_patch_indices(patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """patch_scores [B, N] -> [B, k] int64: the positions (row-major in the patch grid) of the k
    highest-scoring patches, in descending score order: the patches the image head pools (and what the
    app's explanation draws)."""
    return patch_scores.topk(k, dim=1).indices


def select_image_tokens(patch_tokens: torch.Tensor, patch_scores: torch.Tensor, k: int) -> torch.Tensor:
    """patch_tokens [B, N, E], patch_scores [B, N] (CLS attention to each patch) -> [B, k, E], the k
    highest-scoring patches in descending score order (`top_patch_indices`)."""
    index = top_patch_indices(patch_scores, k)  # [B, k]
    return patch_tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, patch_tokens.shape[-1]))


def select_text_tokens(tokens: torch.Tensor, scores: torch.Tensor, eot_index: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k real word tokens per caption.

    tokens [B, L, E], scores [B, L] (EOT attention row), eot_index [B] int64.
    Candidates are positions 1 .. eot-1 (never SOT, EOT or padding); row i keeps
    k_i = min(k, eot_i - 1) tokens. Returns (selected [B, k', E], valid [B, k'] bool,
    index [B, k'] int64) with k' = min(k, L).
    """
    length = tokens.shape[1]
    positions = torch.arange(length, device=tokens.device)
    candidate = (positions > 0) & (positions < eot_index.unsqueeze(1))  # [B, L]
    masked_scores = scores.float().masked_fill(~candidate, float("-inf"))
    width = min(k, length)
    index = masked_scores.topk(width, dim=1).indices  # [B, k']
    word_count = (eot_index - 1).clamp(min=0)
    valid = torch.arange(width, device=tokens.device).unsqueeze(0) < word_count.clamp(max=k).unsqueeze(1)
    selected = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return selected, valid, index


class ImageFusedHead(FusedHead):
    """Image branch: `image_tokens="topk"` pools the k = floor(N·ρ) most attended patches, `"all"` pools
    every patch (CLS excluded), `"reference"` every token, CLS included (the rebuilt reference code's
    behaviour: docs/method.md §10); the CLS token also feeds the global projection in every mode."""

    def __init__(self, embed_dim: int, fused_dim: int, num_patches: int, select_ratio: float,
                 image_tokens: str = "all"):
        super().__init__(embed_dim, fused_dim)
        if image_tokens not in IMAGE_TOKEN_MODES:
            raise ValueError(f"image_tokens must be one of {IMAGE_TOKEN_MODES}, got {image_tokens!r}")
        self.image_tokens = image_tokens
        self.k = num_selected(num_patches, select_ratio)
        # tokens the token MLP runs on per image: k selected patches, every patch, or every token with CLS
        self.pooled = {"topk": self.k, "all": num_patches, "reference": num_patches + 1}[image_tokens]

    def forward(self, tokens: torch.Tensor, attention_row: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1+N, E] (CLS first), attention_row [B, 1+N] -> fused [B, D]."""
        global_embedding, patches = tokens[:, 0], tokens[:, 1:]
        if self.image_tokens == "reference":
            return self.fuse(tokens, global_embedding)
        if self.image_tokens == "topk":
            patches = select_image_tokens(patches, attention_row[:, 1:], self.k)
        return self.fuse(patches, global_embedding)


class TextFusedHead(FusedHead):
    """Text branch: the k = floor(max_words·ρ) most attended real word tokens (max_words = 75 for a
    77-token context), fewer for shorter captions."""

    def __init__(self, embed_dim: int, fused_dim: int, max_words: int, select_ratio: float):
        super().__init__(embed_dim, fused_dim)
        self.k = num_selected(max_words, select_ratio)
        self.pooled = self.k  # tokens the token MLP runs on per caption, at most (shorter captions: fewer)

    def forward(self, tokens: torch.Tensor, attention_row: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, E], attention_row [B, L], eot_index [B] -> fused [B, D]."""
        batch = torch.arange(tokens.shape[0], device=tokens.device)
        global_embedding = tokens[batch, eot_index]
        selected, valid, _ = select_text_tokens(tokens, attention_row, eot_index, self.k)
        return self.fuse(selected, global_embedding, valid)
