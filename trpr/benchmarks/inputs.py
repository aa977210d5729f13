"""Synthetic inputs shared by the benchmark scripts (no dataset, no download)."""
from __future__ import annotations

import torch

from trpr.data.tokenizer import CONTEXT_LENGTH, MASK_TOKEN_ID
from trpr.modeling.clip_configs import EOT_TOKEN_ID, SOT_TOKEN_ID


def synthetic_captions(batch_size: int, words: int = 30, context: int = CONTEXT_LENGTH, *,
                       full_first: bool = False, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded captions `SOT w1 .. w_words EOT 0 ..` of random word ids in [1, MASK_TOKEN_ID):
    (input_ids [B, context] int64, attention_mask [B, context] int64). full_first: the first caption
    fills the whole context (context - 2 words), so a batch trimmed to its longest caption keeps it all."""
    input_ids = torch.zeros(batch_size, context, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    lengths = torch.full((batch_size,), words + 2)
    if full_first:
        lengths[0] = context
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, 0] = SOT_TOKEN_ID
        input_ids[row, 1:length - 1] = torch.randint(1, MASK_TOKEN_ID, (length - 2,), generator=generator)
        input_ids[row, length - 1] = EOT_TOKEN_ID
        attention_mask[row, :length] = 1
    return input_ids, attention_mask
