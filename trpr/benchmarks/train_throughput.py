"""Training throughput of the reciprocal pair: the step alone and the real training loop, side by side.

    python -m trpr.benchmarks.train_throughput                       # GPU: bf16, batch 128; CPU: fp32, batch 2
    python -m trpr.benchmarks.train_throughput --compile off,regional --mode both --json out.json
    python -m trpr.benchmarks.train_throughput --device cpu --batch-size 4 --steps 3 --mode steps
    python -m trpr.benchmarks.train_throughput --peak-tflops 989     # MFU against a stated peak

Two modes, one table (and JSON):
  steps  the trainer's own step, `engine.reciprocal_step` (imported, not copied): uint8 pixels normalised on
         the device, forward, SDM loss over the batch, backward, Adam step, for each model; a synthetic
         batch already on the device (no data loading). `--steps` steps are timed as one sequence, the
         device synchronised only before and after (the trainer never synchronises per step either).
         Once per `--compile` mode (e.g. "off,regional": eager first, then the same models compiled).
  loop   the trainer's own epoch loop, `engine.train_one_epoch`, over the trainer's own DataLoader
         (`engine.build_train_loader`: PNG decoding, resize, augmentation in `--num-workers` persistent
         workers, pinned uint8 batches, non-blocking copies) on a synth-pedes benchmark, with the models of
         the last --compile mode: an untimed epoch of `--warmup` steps (workers start), then `--steps`
         steps of the next epoch timed as a whole, its start (first batches) included. Also printed: the
         loop's own data wait and compute seconds (`engine.timing.StepClock`).

One "pair-sample" = one training sample seen by BOTH models (model A on view 0, model B on view 1), the
unit of the paper's batch: a step of batch B processes B pair-samples. The models: random weights of the
ViT-B/16 architecture (`modeling.vit_b16_config`, no download) unless `--backbone` gives a
`modeling.small_clip_config` mapping (YAML), at `--image-size` (default 384x128).

FLOPs per pair-sample (the MFU numerator) are counted analytically, per model and tower:
6 x (matmul parameters of the transformer layers and projections) x tokens for forward + backward, plus
the attention score and value products 12 x layers x tokens^2 x width; the frozen patch embedding counts
forward only (2 x its parameters x patches); the fused heads count 6 x (token-MLP parameters x selected
tokens + global projection).
Vision runs on 1 + (384/16)(128/16) = 193 tokens, text on the full 77-token context (training cuts each
batch to its longest caption: the synthetic steps batch holds one full-length caption; the loop's real
captions are shorter, so its MFU is an upper bound). Peak FLOP/s per device: bf16 dense tensor-core
peaks of known GPUs (H100/H200 SXM 989 TFLOP/s, A100 312, L40S 362, A10 125, RTX 4090 165), else pass
--peak-tflops; no MFU is printed without a peak.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trpr import data
from trpr import engine
from trpr import modeling
from trpr.benchmarks.gpu_check_summary import format_table
from trpr.benchmarks.inputs import synthetic_captions
from trpr.benchmarks.timing import device_name, guarded, time_sequence
from trpr.configs import CONFIG_DIR, RunConfig, load_config
from trpr.data.tokenizer import get_tokenizer
from trpr.engine.timing import synchronize
from trpr.modeling.losses import TrainingLoss
from trpr.runtime.atomic import atomic_write_text

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
    if model.image_head is not None:  # token MLP on the pooled tokens (head.pooled), global projection once
        parts["fused_heads"] = sum(6 * ((_matmul_params(head) - head.global_proj.weight.numel()) * head.pooled
                                        + head.global_proj.weight.numel())
                                   for head in (model.image_head, model.text_head))
    parts = {name: 2 * value for name, value in parts.items()}  # both models of the pair
    parts["total"] = sum(parts.values())
    return parts


def synthetic_batch(batch_size: int, image_size: tuple[int, int], seed: int = 0) -> dict:
    """A host TrainViews(output="uint8")-shaped batch (2 views) of random pixels, erase boxes (half of them
    empty) and random 30-word captions, 2 samples per pid; the first caption fills the 77-token context, so
    the text tower runs at full length (the worst case: training trims every batch to its longest caption)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    input_ids, attention_mask = synthetic_captions(2 * batch_size, full_first=True, generator=generator)
    boxes = torch.stack([torch.randint(0, height // 2, (batch_size, 2), generator=generator),
                         torch.randint(0, width // 2, (batch_size, 2), generator=generator),
                         torch.randint(1, height // 2, (batch_size, 2), generator=generator),
                         torch.randint(1, width // 2, (batch_size, 2), generator=generator)], dim=-1)
    boxes[torch.rand(batch_size, 2, generator=generator) < 0.5] = 0
    return {"index": torch.arange(batch_size), "pid": torch.arange(batch_size) // 2,
            "pixel_values": torch.randint(0, 256, (batch_size, 2, 3, height, width), dtype=torch.uint8,
                                          generator=generator),
            "erase_boxes": boxes, "input_ids": input_ids.view(batch_size, 2, -1),
            "attention_mask": attention_mask.view(batch_size, 2, -1)}


def build_setup(args, use_cuda: bool) -> dict:
    """The Accelerator, config, pair (on the device), DDP-prepared models, optimizers and loss of a run."""
    from accelerate import Accelerator

    precision = args.precision if args.precision != "auto" else ("bf16" if use_cuda else "no")
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=precision)
    overrides = ["--data.image_size", f"[{args.image_size[0]}, {args.image_size[1]}]",
                 "--data.dataset", args.dataset, "--data.num_workers", str(args.num_workers),
                 "--train.batch_size", str(args.batch_size)]
    if args.backbone:
        overrides += ["--model.backbone", args.backbone]
    config = load_config(CONFIG_DIR / "cuhk-pedes.yaml", overrides)
    torch.manual_seed(0)
    backbone = modeling.vit_b16_config() if not args.backbone else engine.build_clip_source(config["model"]["backbone"])
    pair = modeling.ReciprocalPair.from_clip(backbone, head_seeds=(0, 1), select_ratio=config["model"]["select_ratio"],
                                             fused_dim=config["model"]["fused_dim"],
                                             image_size=tuple(config["data"]["image_size"]))
    for model in pair.models:
        model.set_gradient_checkpointing(args.gradient_checkpointing)
        model.clip.check_text_padding = False  # as the trainer: batch_to_device checks on the host
    pair.to(accelerator.device)
    settings = RunConfig.from_dict(config)
    optimizers = [accelerator.prepare(engine.build_optimizer(m, settings.optim, settings.train.epochs)[0])
                  for m in pair.models]
    return {"accelerator": accelerator, "precision": precision, "config": config, "pair": pair,
            "models": list(accelerator.prepare(*pair.models)), "optimizers": optimizers,
            "loss": TrainingLoss.from_config(config["loss"])}


def time_step_sequence(setup: dict, batch_size: int, steps: int, warmup: int) -> dict:
    """`steps` calls of engine.reciprocal_step on one device-resident synthetic batch, timed as a whole."""
    accelerator = setup["accelerator"]
    device = accelerator.device
    image_size = tuple(setup["config"]["data"]["image_size"])
    batch = engine.batch_to_device(synthetic_batch(batch_size, image_size), device)
    alr_state = engine.AlrState.initial(batch_size, device)

    def step():
        engine.reciprocal_step(setup["models"], setup["optimizers"], batch, alr_state, setup["loss"], accelerator)

    started = time.perf_counter()
    timed = time_sequence(step, device, steps, warmup=warmup)
    return {"seconds": timed["total_s"], "warmup_s": time.perf_counter() - started - timed["total_s"],
            "steps": steps, "data_wait_s": None}


def time_training_loop(setup: dict, steps: int, warmup: int) -> dict:
    """engine.train_one_epoch over the trainer's DataLoader: an untimed epoch of `warmup` steps, then
    `steps` steps of the next epoch timed as a whole (its start included)."""
    accelerator, config = setup["accelerator"], setup["config"]
    device = accelerator.device
    splits = data.load_benchmark(config["data"]["dataset"], root=config["data"]["root"])
    loader = engine.build_train_loader(splits["train"], get_tokenizer(), config, rank=0, world_size=1,
                                       pin_memory=device.type == "cuda")
    steps = min(steps, len(loader))
    alr_state = engine.AlrState.initial(len(loader.dataset), device)
    common = dict(epochs=2, global_step=0, log_every=10**9)
    started = time.perf_counter()
    engine.train_one_epoch(setup["models"], setup["optimizers"], loader, alr_state, setup["loss"], accelerator,
                           epoch=0, max_steps=max(warmup, 1), **common)
    warmup_s = time.perf_counter() - started
    synchronize(device)
    started = time.perf_counter()
    record, _ = engine.train_one_epoch(setup["models"], setup["optimizers"], loader, alr_state, setup["loss"],
                                       accelerator, epoch=1, max_steps=steps, **common)
    return {"seconds": time.perf_counter() - started, "warmup_s": warmup_s, "steps": record.steps,
            "data_wait_s": record.data_wait_s, "compute_s": record.compute_s,
            "workers": config["data"]["num_workers"], "dataset": config["data"]["dataset"]}


def result_row(mode: str, compile_mode: str, timed: dict, batch_size: int, flops: float, peak) -> dict:
    """One table row: throughput, achieved TFLOP/s and MFU of a timed run."""
    throughput = batch_size * timed["steps"] / timed["seconds"]
    achieved = throughput * flops / 1e12
    return {"mode": mode, "compile": compile_mode, "batch_size": batch_size, **timed,
            "seconds_per_step": timed["seconds"] / timed["steps"], "pair_samples_per_s": throughput,
            "achieved_tflops": achieved, "mfu": achieved / peak if peak else None,
            "epoch_minutes_cuhk_pedes": 68126 / throughput / 60}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--mode", choices=["steps", "loop", "both"], default="both")
    parser.add_argument("--compile", default=None,
                        help="comma-separated train.compile modes for the steps rows, e.g. off,regional "
                             "(default: off,regional on GPU, off on CPU); the loop uses the last")
    parser.add_argument("--batch-size", type=int, help="pair-samples per step (default: 128 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 on GPU, 2 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "no"], default="auto",
                        help="mixed precision (auto: bf16 on GPU, none on CPU)")
    parser.add_argument("--backbone", help="a modeling.small_clip_config mapping (YAML) instead of ViT-B/16")
    parser.add_argument("--image-size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"))
    parser.add_argument("--dataset", default="synth-pedes-small", help="loop mode: a synth-pedes benchmark")
    parser.add_argument("--num-workers", type=int, help="loop mode: DataLoader workers (default: 8 on GPU, 2 on CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s per device for MFU (default: known GPUs)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.batch_size = args.batch_size or (128 if use_cuda else 2)
    args.num_workers = args.num_workers if args.num_workers is not None else (8 if use_cuda else 2)
    steps = args.steps or (20 if use_cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if use_cuda else 1)
    compile_modes = (args.compile or ("off,regional" if use_cuda else "off")).split(",")
    setup = build_setup(args, use_cuda)
    device = setup["accelerator"].device
    flops = flops_per_pair_sample(setup["pair"].a)
    peak, name = device_peak_tflops(device)
    peak = args.peak_tflops or peak
    height, width = args.image_size
    rows = []
    result = {"device": name, "precision": setup["precision"], "image_size": [height, width],
              "backbone": args.backbone or "vit_b16", "gflops_per_pair_sample": flops["total"] / 1e9,
              "peak_tflops": peak, "torch": torch.__version__, "rows": rows, "peak_memory_gib": None,
              "complete": False}

    def add(row):        # the JSON is rewritten after every row: a run killed later keeps the rows it finished
        rows.append(row)
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        if use_cuda:
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")

    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    compiled = "off"
    for mode in compile_modes:
        resolved = engine.resolve_compile_mode(False if mode == "false" else mode, device)
        if resolved != compiled:
            if compiled != "off":
                raise SystemExit("--compile: list eager (off) first; a compiled model cannot be un-compiled")
            for model in setup["pair"].models:
                engine.compile_model(model, resolved)
            compiled = resolved
        if args.mode in ("steps", "both"):
            measured = guarded(lambda: time_step_sequence(setup, args.batch_size, steps, warmup))
            add(_row("steps", compiled, measured, args.batch_size, flops["total"], peak))
    if args.mode in ("loop", "both"):
        measured = guarded(lambda: time_training_loop(setup, steps, warmup))
        add(_row("loop", compiled, measured, args.batch_size, flops["total"], peak))
    result["complete"] = True
    print(f"\nreciprocal pair ({result['backbone']}) at {height}x{width}, {name}, {setup['precision']}, "
          f"{flops['total'] / 1e9:.1f} GFLOP per pair-sample"
          + (f", MFU against {peak:.0f} TFLOP/s" if peak else " (no MFU: pass --peak-tflops)") + "\n")
    print(format_table(rows))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return result


def _row(mode: str, compile_mode: str, measured: dict, batch_size: int, flops: float, peak) -> dict:
    if measured["status"] != "ok":
        return {"mode": mode, "compile": compile_mode, "batch_size": batch_size, "status": measured["status"]}
    measured.pop("status")
    return {"status": "ok", **result_row(mode, compile_mode, measured, batch_size, flops, peak)}


if __name__ == "__main__":
    main()
