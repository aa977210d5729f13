"""3RTPR modeling: CLIP backbone at 384×128, fused heads, TRPRModel, ReciprocalPair, scoring features, losses.

Imports only torch, transformers, safetensors and huggingface_hub (ALR's scikit-learn import is lazy, in
`modeling.alr`). Also here: the losses (`modeling.losses`), differentiable collectives, the Hub mixin
(`modeling.hub`). The run-folder layout is `runtime.run_folder`'s.
"""
from . import alr
from .clip_configs import small_clip_config, vit_b16_config
from .model import TRPRModel
from .pair import ReciprocalPair, scoring_features

__all__ = ["TRPRModel", "ReciprocalPair", "scoring_features", "small_clip_config", "vit_b16_config", "alr"]
