"""Parameter counts and forward (or forward + backward) timings of TRPRModel (random init, no download).

    python -m trpr.benchmarks.encoders                      # full ViT-B/16 config, batch 8, 384×128, CPU
    python -m trpr.benchmarks.encoders --config small --batch-size 32
    python -m trpr.benchmarks.encoders --device cuda --dtype bf16 --train   # forward + backward under autocast

Prints one JSON object: parameter counts (backbone / heads / trainable) and the median / fastest
milliseconds per call of encode_image and encode_text (text at the full 77-token context, 30 words per
caption), timed by `benchmarks.timing.time_call` over --repeats calls.
"""
from __future__ import annotations

import argparse
import json

import torch

from trpr.benchmarks.inputs import synthetic_captions
from trpr.benchmarks.timing import device_name, time_call
from trpr.modeling.clip_configs import small_clip_config, vit_b16_config
from trpr.modeling.model import TRPRModel, count_parameters


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("vit-b16", "small"), default="vit-b16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument("--train", action="store_true", help="time forward + backward in training mode")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = vit_b16_config() if args.config == "vit-b16" else small_clip_config()
    model = TRPRModel.from_clip(config, image_size=tuple(args.image_size)).to(device)
    model.train(args.train)
    model.set_gradient_checkpointing(args.gradient_checkpointing)
    pixels = torch.randn(args.batch_size, 3, *args.image_size, device=device)
    ids, mask = (t.to(device) for t in synthetic_captions(args.batch_size))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def run(encode):
        def call():
            with autocast, torch.set_grad_enabled(args.train):
                global_embedding, fused = encode()
            if args.train:
                (global_embedding.sum() + fused.sum()).backward()
                model.zero_grad(set_to_none=True)
        return call

    result = {
        "config": args.config, "device": device_name(device), "dtype": args.dtype,
        "mode": "train" if args.train else "eval", "batch_size": args.batch_size, "image_size": list(args.image_size),
        "parameters": count_parameters(model),
        "encode_image": time_call(run(lambda: model.encode_image(pixels)), device, args.repeats),
        "encode_text": time_call(run(lambda: model.encode_text(ids, mask)), device, args.repeats),
    }
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
