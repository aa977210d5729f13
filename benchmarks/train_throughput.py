"""Training throughput of the reciprocal pair: pair-samples/s and MFU at 384x128 with the full ViT-B/16.

    python -m benchmarks.train_throughput                          # GPU: bf16, batch 128; CPU: fp32, batch 2
    python -m benchmarks.train_throughput --batch-size 4 --steps 3 --device cpu
    python -m benchmarks.train_throughput --peak-tflops 989        # MFU against a stated peak

One "pair-sample" = one training sample seen by BOTH models (model A on view 0, model B on view 1), the
unit of the paper's batch: a step of batch B processes B pair-samples. A timed step is exactly the training
loop's `engine.reciprocal_step` (forward, SDM loss over the batch, backward, Adam step, for each model)
on random weights (`modeling.vit_b16_config`, no download) and synthetic tensors (no data loading); each
step is timed on its own by `benchmarks.timing.time_steps`.

FLOPs per pair-sample (the MFU numerator) are counted analytically, per model and tower:
6 x (matmul parameters of the transformer layers and projections) x tokens for forward + backward, plus
the attention score and value products 12 x layers x tokens^2 x width; the frozen patch embedding counts
forward only (2 x its parameters x patches); the fused heads count 6 x (token-MLP parameters x selected
tokens + global projection).
Vision runs on 1 + (384/16)(128/16) = 193 tokens, text on the full 77-token context (training cuts each
batch to its longest caption; the synthetic batch holds one full-length caption). Peak FLOP/s per
device: bf16 dense tensor-core peaks of known GPUs (H100/H200 SXM 989 TFLOP/s, A100 312, L40S 362, A10 125,
RTX 4090 165), else pass --peak-tflops; no MFU is printed without a peak.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import engine
import modeling
from benchmarks.inputs import synthetic_captions
from benchmarks.timing import device_name, time_steps
from configs import CONFIG_DIR, load_config
from modeling.losses import TrainingLoss

# bf16 dense peak TFLOP/s per device (vendor datasheets, without sparsity), matched on the device name
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def device_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(peak bf16 TFLOP/s, device name) for a CUDA device in KNOWN_PEAK_TFLOPS, else (None, the device's name)."""
    name = device_name(device)
    if device.type != "cuda":
        return None, name
    for key, peak in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return peak, name
    return None, name


def _matmul_params(module: torch.nn.Module) -> int:
    """Parameters of the nn.Linear weights of `module` (the ones that cost 2 FLOPs per token forward)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def flops_per_pair_sample(model: modeling.TRPRModel, text_tokens: int = 77) -> dict:
    """Training FLOPs (forward + backward) of one sample through ONE model, per part; x2 for the pair."""
    clip = model.clip
    vision_cfg, text_cfg = clip.config.vision_config, clip.config.text_config
    image_tokens = 1 + clip.num_patches
    vision_linear = _matmul_params(clip.vision_model.encoder) + clip.visual_projection.weight.numel()
    text_linear = _matmul_params(clip.text_model.encoder) + clip.text_projection.weight.numel()
    patch_embedding = clip.vision_model.embeddings.patch_embedding.weight.numel()
    parts = {
        "vision_layers": 6 * vision_linear * image_tokens
        + 12 * vision_cfg.num_hidden_layers * image_tokens ** 2 * vision_cfg.hidden_size,
        "vision_patch_embedding": 2 * patch_embedding * clip.num_patches,
        "text_layers": 6 * text_linear * text_tokens
        + 12 * text_cfg.num_hidden_layers * text_tokens ** 2 * text_cfg.hidden_size,
    }
    if model.image_head is not None:  # token MLP on the k selected tokens, global projection once
        parts["fused_heads"] = sum(6 * ((_matmul_params(head) - head.global_proj.weight.numel()) * head.k
                                        + head.global_proj.weight.numel())
                                   for head in (model.image_head, model.text_head))
    parts = {name: 2 * value for name, value in parts.items()}  # both models of the pair
    parts["total"] = sum(parts.values())
    return parts


def synthetic_batch(batch_size: int, image_size: tuple[int, int], device: torch.device, seed: int = 0) -> dict:
    """A TrainViews-shaped batch (2 views) of random pixels and random 30-word captions, 2 samples per pid;
    the first caption fills the 77-token context, so the text tower runs at full length (the worst case:
    training trims every batch to its longest caption)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    input_ids, attention_mask = synthetic_captions(2 * batch_size, full_first=True, generator=generator)
    batch = {"index": torch.arange(batch_size), "pid": torch.arange(batch_size) // 2,
             "pixel_values": torch.randn(batch_size, 2, 3, height, width, generator=generator),
             "input_ids": input_ids.view(batch_size, 2, -1), "attention_mask": attention_mask.view(batch_size, 2, -1)}
    return {key: value.to(device) for key, value in batch.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=int, help="pair-samples per step (default: 128 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 on GPU, 2 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "no"], default="auto",
                        help="mixed precision (auto: bf16 on GPU, none on CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s per device for MFU (default: known GPUs)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    precision = args.precision if args.precision != "auto" else ("bf16" if use_cuda else "no")
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=precision)
    device = accelerator.device
    batch_size = args.batch_size or (128 if use_cuda else 2)
    steps = args.steps or (20 if use_cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if use_cuda else 1)
    config = load_config(CONFIG_DIR / "cuhk-pedes.yaml")
    image_size = tuple(config["data"]["image_size"])

    torch.manual_seed(0)
    pair = modeling.ReciprocalPair.from_clip(modeling.vit_b16_config(), head_seeds=(0, 1),
                                             select_ratio=config["model"]["select_ratio"],
                                             fused_dim=config["model"]["fused_dim"], image_size=image_size)
    for model in pair.models:
        model.set_gradient_checkpointing(args.gradient_checkpointing)
    pair.to(device)
    models = list(accelerator.prepare(*pair.models))
    optimizers = [accelerator.prepare(engine.build_optimizer(m, config)[0]) for m in pair.models]
    loss = TrainingLoss.from_config(config["loss"])
    batch = synthetic_batch(batch_size, image_size, device)
    alr_state = engine.initial_alr_state(batch_size, device)

    def step():
        engine.reciprocal_step(models, optimizers, batch, alr_state, loss, accelerator)

    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    timed = time_steps(step, device, steps, warmup=warmup)
    seconds = timed["total_s"]

    flops = flops_per_pair_sample(pair.a)
    throughput = batch_size * steps / seconds
    achieved_tflops = throughput * flops["total"] / 1e12
    peak, name = device_peak_tflops(device)
    peak = args.peak_tflops or peak
    result = {"device": name, "precision": precision, "batch_size": batch_size, "steps": steps,
              "image_size": list(image_size), "seconds_per_step": seconds / steps,
              "median_step_ms": timed["ms"], "pair_samples_per_s": throughput,
              "gflops_per_pair_sample": flops["total"] / 1e9,
              "achieved_tflops": achieved_tflops, "peak_tflops": peak,
              "mfu": achieved_tflops / peak if peak else None,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda else None,
              "epoch_minutes_cuhk_pedes": 68126 / throughput / 60}
    print(f"reciprocal pair, ViT-B/16 at {image_size[0]}x{image_size[1]}, {name}, {precision}, "
          f"batch {batch_size}: {throughput:.2f} pair-samples/s ({seconds / steps:.3f} s/step), "
          f"{flops['total'] / 1e9:.1f} GFLOP per pair-sample, {achieved_tflops:.2f} TFLOP/s achieved"
          + (f", MFU {result['mfu']:.1%} of {peak:.0f} TFLOP/s" if peak else " (no MFU: pass --peak-tflops)")
          + f"; one CUHK-PEDES epoch (68,126 samples) ~ {result['epoch_minutes_cuhk_pedes']:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
