"""3RTPR modeling: CLIP backbone at 384×128, fused heads, TRPRModel, ReciprocalPair, scoring features.

Imports only torch, transformers and safetensors (ALR's scikit-learn import is lazy, in `modeling.alr`).
"""
from . import alr
from .clip_configs import small_clip_config, vit_b16_config
from .model import TRPRModel
from .pair import ReciprocalPair, scoring_features

__all__ = ["TRPRModel", "ReciprocalPair", "scoring_features", "small_clip_config", "vit_b16_config", "alr"]
