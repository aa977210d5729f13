"""CLIP architecture configs that need no download (vit_b16_config, small_clip_config) and the CLIP token ids:
re-exported from `configs.clip_configs`, their home (configs validates a `model.backbone` mapping with
small_clip_config and must not import modeling)."""
from trpr.configs.clip_configs import (CLIP_VOCAB_SIZE, EOT_TOKEN_ID, SOT_TOKEN_ID,  # noqa: F401
                                       small_clip_config, vit_b16_config)

__all__ = ["CLIP_VOCAB_SIZE", "EOT_TOKEN_ID", "SOT_TOKEN_ID", "small_clip_config", "vit_b16_config"]
