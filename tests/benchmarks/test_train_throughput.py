"""trpr/benchmarks/: the training-throughput FLOP count agrees with torch's FLOP counter on a real step; the
synthetic inputs and the shared timing helper."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trpr import engine
from trpr import modeling
from trpr.benchmarks import timing
from trpr.benchmarks.inputs import synthetic_captions


@pytest.fixture(scope="module")
def throughput():
    import trpr.benchmarks.train_throughput

    return trpr.benchmarks.train_throughput


@pytest.mark.parametrize("image_tokens", ["topk", "all", "reference"])
def test_flops_per_pair_sample_matches_the_flop_counter(throughput, image_tokens):
    torch.manual_seed(0)
    config = modeling.small_clip_config(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, projection_dim=64)
    pair = modeling.ReciprocalPair.from_clip(config, select_ratio=0.2, fused_dim=256, image_size=(128, 64),
                                             image_tokens=image_tokens)
    batch = throughput.synthetic_batch(4, (128, 64))
    # the math SDPA backend runs attention as counted matmuls (the fused CPU kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        for view, model in enumerate(pair.models):
            image_global, image_fused = model.encode_image(engine.batch_to_device(batch, "cpu").pixels(view))
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
    peak, name = throughput.device_peak_tflops(torch.device("cpu"))
    assert peak is None and name.startswith("CPU ")
    assert throughput.KNOWN_PEAK_TFLOPS["H100"] == throughput.KNOWN_PEAK_TFLOPS["H200"] == 989.0


def test_synthetic_captions_are_right_padded_clip_captions():
    from trpr.modeling.clip_configs import EOT_TOKEN_ID, SOT_TOKEN_ID

    ids, mask = synthetic_captions(3, words=5, full_first=True, generator=torch.Generator().manual_seed(0))
    assert ids.shape == mask.shape == (3, 77)
    assert mask.sum(1).tolist() == [77, 7, 7]
    assert (ids[:, 0] == SOT_TOKEN_ID).all() and ids[0, 76] == EOT_TOKEN_ID and (ids[1:, 6] == EOT_TOKEN_ID).all()
    assert (ids[1:, 7:] == 0).all() and (ids[:, 1:6] < SOT_TOKEN_ID - 1).all() and (ids[:, 1:6] >= 1).all()


def test_time_steps_times_every_call_after_the_warmup():
    calls = []
    result = timing.time_steps(lambda: calls.append(1), torch.device("cpu"), steps=4, warmup=2,
                               before=lambda: calls.append(0))
    assert calls == [1, 1] + [0, 1] * 4
    assert set(result) == {"ms", "min_ms", "total_s"} and 0 <= result["min_ms"] <= result["ms"]
    assert set(timing.time_call(lambda: None, torch.device("cpu"), 3)) == {"ms", "min_ms"}
    calls.clear()
    sequence = timing.time_sequence(lambda: calls.append(1), torch.device("cpu"), steps=5, warmup=2)
    assert len(calls) == 7 and sequence["total_s"] >= 0 and sequence["ms"] == pytest.approx(sequence["total_s"] * 200)


def test_throughput_times_the_trainers_step_and_loop(throughput, tmp_path, monkeypatch):
    """Both modes on the CPU with a tiny backbone: the steps rows call engine.reciprocal_step, the loop row
    engine.train_one_epoch over engine.build_train_loader's batches; one table, one JSON."""
    import json

    calls = {"step": 0, "epoch": 0}
    real_step, real_epoch = engine.reciprocal_step, engine.train_one_epoch

    def counting(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(engine, "reciprocal_step", counting("step", real_step))
    monkeypatch.setattr(engine.step, "reciprocal_step", counting("step", real_step))
    monkeypatch.setattr(engine, "train_one_epoch", counting("epoch", real_epoch))
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    on_disk = []
    real_loop = throughput.time_training_loop

    def loop_after_reading_the_json(*args, **kwargs):     # the steps row is on disk before the loop starts
        on_disk.append(json.loads((tmp_path / "throughput.json").read_text()))
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(throughput, "time_training_loop", loop_after_reading_the_json)
    result = throughput.main(["--device", "cpu", "--backbone", "{hidden_size: 32, intermediate_size: 64, "
                              "num_hidden_layers: 1, num_attention_heads: 2, projection_dim: 32}",
                              "--image-size", "32", "16", "--dataset", "synth-pedes-tiny", "--batch-size", "8",
                              "--steps", "3", "--warmup", "1", "--num-workers", "0", "--peak-tflops", "1",
                              "--json", str(tmp_path / "throughput.json")])
    assert [(row["mode"], row["compile"], row["status"]) for row in result["rows"]] == [("steps", "off", "ok"),
                                                                                         ("loop", "off", "ok")]
    assert calls["epoch"] == 2 and calls["step"] == (1 + 3) + (1 + 3)  # warm-up + timed, per mode
    for row in result["rows"]:
        assert row["steps"] == 3 and row["pair_samples_per_s"] == pytest.approx(8 * 3 / row["seconds"])
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 1.0)
    assert result["rows"][1]["data_wait_s"] >= 0 and result["rows"][1]["compute_s"] > 0
    assert json.loads((tmp_path / "throughput.json").read_text())["rows"][1]["mode"] == "loop"
    assert [row["mode"] for row in on_disk[0]["rows"]] == ["steps"] and on_disk[0]["complete"] is False
    assert json.loads((tmp_path / "throughput.json").read_text())["complete"] is True
    assert "| loop | off | 8 | 3 |" in throughput.format_table(result["rows"])
