"""scripts/train_throughput.py: the analytic FLOP count agrees with torch's FLOP counter on a real step."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import modeling

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_pair_sample_matches_the_flop_counter(throughput):
    torch.manual_seed(0)
    config = modeling.small_clip_config(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, projection_dim=64)
    pair = modeling.ReciprocalPair.from_clip(config, select_ratio=0.2, fused_dim=256, image_size=(128, 64))
    batch = throughput.synthetic_batch(4, (128, 64), torch.device("cpu"))
    # the math SDPA backend runs attention as counted matmuls (the fused CPU kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        for view, model in enumerate(pair.models):
            image_global, image_fused = model.encode_image(batch["pixel_values"][:, view])
            text_global, text_fused = model.encode_text(batch["input_ids"][:, view], batch["attention_mask"][:, view])
            (image_fused.sum() + text_fused.sum()).backward()
    counted_per_sample = counter.get_total_flops() / 4
    analytic = throughput.flops_per_pair_sample(pair.a)
    assert analytic["total"] == pytest.approx(counted_per_sample, rel=0.02)
    assert set(analytic) >= {"vision_layers", "text_layers", "fused_heads", "total"}


def test_vit_b16_flops_are_in_the_expected_range(throughput):
    """ViT-B/16 (86M encoder params) at 193 tokens: ~34 GFLOP forward, x3 for training, + text, x2 models."""
    with torch.device("meta"):
        model = modeling.TRPRModel.from_clip(modeling.vit_b16_config(), image_size=(384, 128))
    flops = throughput.flops_per_pair_sample(model)
    assert 2 * 3 * 33e9 < flops["vision_layers"] < 2 * 3 * 37e9
    assert 200e9 < flops["total"] < 280e9


def test_known_peaks_cover_h100_and_h200(throughput):
    assert throughput.device_peak_tflops(torch.device("cpu")) == (None, "cpu")
    assert throughput.KNOWN_PEAK_TFLOPS["H100"] == throughput.KNOWN_PEAK_TFLOPS["H200"] == 989.0
