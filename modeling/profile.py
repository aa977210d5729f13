"""Parameter counts and forward timings of TRPRModel (random init, no download).

    python -m modeling.profile                      # full ViT-B/16 config, batch 8, 384×128, CPU
    python -m modeling.profile --config small --batch-size 32
    python -m modeling.profile --device cuda --dtype bf16 --train   # forward + backward under autocast

Prints one JSON object: parameter counts (backbone / heads / trainable) and the median seconds per
call of encode_image and encode_text (text at the full 77-token context) over --repeats calls after
one warm-up call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .clip_configs import small_clip_config, vit_b16_config
from .model import TRPRModel, count_parameters


def captions(batch_size: int, context: int = 77, words: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic right-padded ids [B, context] with `words` word tokens per caption, and the mask."""
    ids = torch.zeros(batch_size, context, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, 0] = 49406
    ids[:, 1:words + 1] = torch.randint(1, 49000, (batch_size, words))
    ids[:, words + 1] = 49407
    mask[:, :words + 2] = 1
    return ids, mask


def time_call(function, repeats: int, device: torch.device) -> float:
    """Median wall seconds of `function()` over `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    ids, mask = (t.to(device) for t in captions(args.batch_size))
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
        "config": args.config, "device": str(device), "dtype": args.dtype, "mode": "train" if args.train else "eval",
        "batch_size": args.batch_size, "image_size": list(args.image_size), "torch_threads": torch.get_num_threads(),
        "parameters": count_parameters(model),
        "encode_image_s": time_call(run(lambda: model.encode_image(pixels)), args.repeats, device),
        "encode_text_s": time_call(run(lambda: model.encode_text(ids, mask)), args.repeats, device),
    }
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
