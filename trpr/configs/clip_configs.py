"""CLIP architecture configs that need no download: the exact ViT-B/16 layout and a tiny test config.

Pure builders of a transformers CLIPConfig from keys (no weights, no trpr import): they live in configs so that
`configs.validate` can check a `model.backbone` mapping without importing `modeling` (configs is a leaf,
docs/design.md); `modeling.clip_configs` re-exports them. transformers is imported only when this module is
(configs imports it lazily, for a mapping backbone)."""
from __future__ import annotations

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

CLIP_VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407


def _build(text: dict, vision: dict, projection_dim: int) -> CLIPConfig:
    text_config = CLIPTextConfig(**text)
    vision_config = CLIPVisionConfig(**vision)
    return CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                      projection_dim=projection_dim)


def vit_b16_config() -> CLIPConfig:
    """The architecture of `openai/clip-vit-base-patch16` (random init, no download): text 12 layers ×
    512 wide, 8 heads, 77 positions; vision 12 layers × 768 wide, 12 heads, patch 16, 224 px (14×14
    position grid); quick-GELU; joint space 512."""
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=512, bos_token_id=SOT_TOKEN_ID, eos_token_id=EOT_TOKEN_ID, pad_token_id=1)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=512)
    return _build(text, vision, 512)


def small_clip_config(**overrides) -> CLIPConfig:
    """A tiny random-init CLIP for tests and the offline demo: width 64, 2 layers, 4 heads, patch 16,
    224 px native grid (14×14, like ViT-B/16, so the 24×8 resize path is exercised), joint space 64,
    the CLIP vocabulary (49408) and 77 text positions.

    Overrides: `projection_dim=`; `text_<field>=` / `vision_<field>=` for one tower
    (e.g. `vision_num_hidden_layers=3`); a bare `<field>=` sets it on both towers (e.g. `hidden_size=96`).
    """
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                bos_token_id=SOT_TOKEN_ID, eos_token_id=EOT_TOKEN_ID, pad_token_id=1)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=224, patch_size=16, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    projection_dim = 64
    known_text, known_vision = set(CLIPTextConfig().to_dict()), set(CLIPVisionConfig().to_dict())
    for key, value in overrides.items():
        if key == "projection_dim":
            projection_dim = int(value)
        elif key.startswith("text_") and key[5:] in known_text:
            text[key[5:]] = value
        elif key.startswith("vision_") and key[7:] in known_vision:
            vision[key[7:]] = value
        elif key in known_text and key in known_vision:
            text[key] = value
            vision[key] = value
        else:
            raise ValueError(f"small_clip_config: unknown override {key!r} (use projection_dim, text_<field>, "
                             f"vision_<field>, or a field both towers have)")
    text["projection_dim"] = vision["projection_dim"] = projection_dim
    return _build(text, vision, projection_dim)
