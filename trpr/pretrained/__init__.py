"""Pretrained weights shipped with the project.

PROXY_CLIP: the folder of the pretrained proxy CLIP (a `transformers` CLIP folder, fp16 weights; its model card
is README.md inside), the demo's backbone: `--model.backbone trpr/pretrained/proxy_clip` from the repository
root. Written by `python -m trpr.experiments.proxy_ship --write` from the build of
`trpr.experiments.proxy_pretrain`.
"""
from pathlib import Path

PROXY_CLIP = Path(__file__).resolve().parent / "proxy_clip"
