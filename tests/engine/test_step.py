"""engine building blocks: batches, schedule, parameter groups, one reciprocal step."""
import math

import pytest
import torch

from trpr import engine
from trpr import kernels
from trpr import modeling
from trpr.configs import RunConfig, load_config
from trpr.modeling.losses import TrainingLoss

TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "projection_dim": 32}


def tiny_config(**sections):
    overrides = ["--model.fused_dim", "64", "--data.image_size", "[32, 16]", "--train.epochs", "4"]
    for key, value in sections.items():
        overrides += [f"--{key}", str(value)]
    return load_config(None, overrides)


def optim_of(config: dict) -> tuple:
    """(optim section, train.epochs): what engine.build_optimizer(s) takes from a config."""
    settings = RunConfig.from_dict(config)
    return settings.optim, settings.train.epochs


def test_global_batches_are_split_evenly_and_agree_with_one_process():
    one = engine.sampler.GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=3)
    two = [engine.sampler.GlobalBatchSampler(50, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in [one, *two]:
        sampler.set_epoch(5)
    single = list(one)
    shares = [list(s) for s in two]
    assert len(single) == 6 and all(len(batch) == 8 for batch in single)  # 50 // 8, last batch dropped
    assert [a + b for a, b in zip(*shares)] == single
    one.set_epoch(6)
    assert list(one) != single  # a new order every epoch
    assert len({i for batch in single for i in batch}) == 48
    with pytest.raises(ValueError, match="not divisible"):
        engine.sampler.GlobalBatchSampler(50, 9, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="exceeds the training set"):
        engine.sampler.GlobalBatchSampler(5, 8, rank=0, world_size=1, seed=0)


def test_lr_schedule_warmup_then_cosine():
    factors = [engine.optim.lr_factor(e, epochs=60, warmup_epochs=5, warmup_factor=0.1) for e in range(60)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[1] == pytest.approx(0.1 + 0.9 / 5)
    assert factors[5] == pytest.approx(1.0)
    assert factors[5 + 55 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 27 / 55)))
    assert factors[59] < 0.01 and all(a >= b for a, b in zip(factors[5:], factors[6:]))


def test_param_groups_follow_the_recipe():
    config = tiny_config()
    model = modeling.TRPRModel.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16))
    groups = {g["name"]: g for g in engine.optim.param_groups(model, RunConfig.from_dict(config).optim)}
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (1e-5, 4e-5)
    assert (groups["backbone_bias"]["lr"], groups["backbone_bias"]["weight_decay"]) == (2e-5, 0.0)
    assert (groups["heads"]["lr"], groups["heads"]["weight_decay"]) == (1e-3, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("clip.") and names[id(p)].endswith("bias") for p in groups["backbone_bias"]["params"])
    assert all(not names[id(p)].startswith("clip.") for p in groups["heads"]["params"])
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)  # frozen patch conv left out
    optimizer, scheduler = engine.build_optimizer(model, *optim_of(config))
    assert optimizer.defaults["eps"] == 1e-3 and optimizer.defaults["betas"] == (0.9, 0.999)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # warm-up starts at 0.1x


def test_adam_is_fused_where_torch_has_it_and_matches_the_multi_tensor_update():
    config = tiny_config()
    torch.manual_seed(0)
    model = modeling.TRPRModel.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16))
    twin = modeling.TRPRModel.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16))
    twin.load_state_dict(model.state_dict())
    optimizer, _ = engine.build_optimizer(model, *optim_of(config))
    assert optimizer.defaults["fused"] is ("cpu" in engine.optim._fused_adam_devices() or None)
    groups = engine.optim.param_groups(twin, RunConfig.from_dict(config).optim)
    for group, built in zip(groups, optimizer.param_groups):
        group["lr"] = built["lr"]  # the warm-up factor the schedule applied
    reference = torch.optim.Adam(groups, eps=config["optim"]["eps"], betas=tuple(config["optim"]["betas"]), foreach=True)
    for _ in range(3):
        for each in (model, twin):
            for parameter in each.parameters():
                parameter.grad = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel()))
        optimizer.step()
        reference.step()
    for (name, mine), (_, theirs) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def on_device(batch: dict) -> engine.batch.TrainBatch:
    """The step's input: the host batch on the (CPU) device, as train_one_epoch moves it."""
    return engine.batch_to_device(batch, torch.device("cpu"))


def _tiny_setup(config, **model_options):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    pair = modeling.ReciprocalPair.from_clip(modeling.small_clip_config(**TINY_CLIP), head_seeds=(0, 1),
                                             fused_dim=64, image_size=(32, 16), **model_options)
    optimizers = [engine.build_optimizer(m, *optim_of(config))[0] for m in pair.models]
    generator = torch.Generator().manual_seed(1)
    batch = {"index": torch.arange(8), "pid": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
             "pixel_values": torch.randn(8, 2, 3, 32, 16, generator=generator),
             "input_ids": torch.randint(1, 49000, (8, 2, 77), generator=generator),
             "attention_mask": torch.zeros(8, 2, 77, dtype=torch.long)}
    batch["attention_mask"][:, :, :12] = 1
    batch["input_ids"][:, :, 0] = 49406
    batch["input_ids"][:, :, 11] = 49407
    alr_state = engine.AlrState.initial(8, "cpu")
    return accelerator, pair, optimizers, batch, alr_state


@pytest.mark.parametrize("loss", ["sdm", "trl"])
def test_one_step_lowers_both_losses(loss):
    config = tiny_config(**{"loss.lambda_sdm": float(loss == "sdm"), "loss.lambda_trl": float(loss == "trl"),
                            "optim.backbone_lr": 1e-3, "optim.warmup_epochs": 0})
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    loss = TrainingLoss.from_config(config["loss"])
    before = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator).tolist()
    after = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator).tolist()
    assert before[0] != before[1]  # different heads, different views
    assert after[0] < before[0] and after[1] < before[1]


def test_weights_and_keep_flags_enter_the_loss():
    config = tiny_config()
    # frozen weights (every step sees the same model): lr 0, set after the config check, which refuses it
    config["optim"]["backbone_lr"] = config["optim"]["head_lr"] = 0.0
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    loss = TrainingLoss.from_config(config["loss"])
    base = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator).tolist()
    half = engine.AlrState(torch.full((8,), 0.5), torch.ones(8, dtype=torch.bool))
    halved = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), half, loss, accelerator).tolist()
    assert halved == pytest.approx([0.5 * b for b in base], rel=1e-4)  # sum(h w l) / sum(h)
    dropped = engine.AlrState(torch.ones(8), torch.arange(8) < 4)
    partial = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), dropped, loss, accelerator).tolist()
    assert all(p != pytest.approx(b, rel=1e-3) for p, b in zip(partial, base))  # mean over kept samples only


def test_a_non_finite_loss_stops_the_epoch_at_the_next_check(monkeypatch):
    """The step never reads the loss back; train_one_epoch checks every log_every steps and at the end of
    the epoch and names the first non-finite step and model."""
    config = tiny_config()
    loss = TrainingLoss.from_config(config["loss"])
    real_sdm, calls = kernels.sdm_loss, []

    def nan_from_the_third_call(t, i, *args, **kwargs):  # model A of step 1 (calls: A0, B0, A1, ...)
        calls.append(1)
        out = real_sdm(t, i, *args, **kwargs)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(kernels, "sdm_loss", nan_from_the_third_call)
    steps_run = []
    real_step = engine.step.reciprocal_step
    monkeypatch.setattr(engine.step, "reciprocal_step", lambda *a, **k: steps_run.append(1) or real_step(*a, **k))

    def run(log_every):
        accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)  # fresh weights (the NaN stepped)
        steps_run.clear()
        calls.clear()
        with pytest.raises(engine.TrainingDiverged, match=r"model A at epoch 3, step 1 \(global step 11\)"):
            engine.train_one_epoch(list(pair.models), optimizers, [batch] * 6, alr_state, loss, accelerator,
                                   epoch=3, epochs=4, global_step=10, log_every=log_every,
                                   batches=iter([batch] * 6))
        return len(steps_run)

    assert run(log_every=2) == 2    # checked after global step 12: stops there
    assert run(log_every=100) == 6  # checked at the end of the epoch only


def test_epoch_means_and_step_times(monkeypatch):
    config = tiny_config()
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    loss = TrainingLoss.from_config(config["loss"])
    shares = []
    real_step = engine.step.reciprocal_step
    monkeypatch.setattr(engine.step, "reciprocal_step",
                        lambda *a, **k: shares.append(real_step(*a, **k)) or shares[-1])
    record, step = engine.train_one_epoch(list(pair.models), optimizers, [batch] * 3, alr_state, loss, accelerator,
                                          epoch=0, epochs=1, global_step=5, log_every=2, batches=iter([batch] * 3))
    assert step == 8 and record.step == 8 and record.steps == 3
    expected = torch.stack(shares).double().mean(0)
    assert record.loss_a == expected[0].item() and record.loss_b == expected[1].item()
    assert record.compute_s > 0 and record.data_wait_s >= 0


def test_uint8_batches_on_the_device_equal_the_float_path():
    """batch_to_device + TrainBatch.pixels on a TrainViews(output="uint8") batch == the float path's pixels, and
    the trimmed captions match trim_text_padding; a badly padded mask is refused on the host."""
    from trpr.data.transforms import build_image_transform, normalize_uint8

    generator = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (3, 2, 3, 32, 16), dtype=torch.uint8, generator=generator)
    boxes = torch.tensor([[[2, 3, 5, 4], [0, 0, 0, 0]], [[0, 0, 32, 16], [10, 1, 3, 3]], [[0, 0, 0, 0]] * 2])
    transform = build_image_transform(train=True, image_size=(32, 16))
    expected = torch.stack([torch.stack([transform.to_float(uint8[i, v].numpy(), tuple(boxes[i, v].tolist()))
                                         for v in range(2)]) for i in range(3)])
    mask = torch.zeros(3, 2, 77, dtype=torch.long)
    for (row, view), length in zip([(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)], [5, 9, 7, 4, 4, 12]):
        mask[row, view, :length] = 1
    batch = {"index": torch.arange(3), "pid": torch.arange(3), "pixel_values": uint8, "erase_boxes": boxes,
             "input_ids": torch.randint(1, 1000, (3, 2, 77), generator=generator) * mask, "attention_mask": mask}
    moved = engine.batch_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, engine.batch.TrainBatch) and moved.text_lengths == (9, 12)
    assert torch.equal(moved.index, batch["index"]) and torch.equal(moved.pids, batch["pid"])
    for view in range(2):
        assert torch.equal(moved.pixels(view), expected[:, view])
        ids, trimmed = moved.text(view)
        assert torch.equal(ids, engine.step.trim_text_padding(batch["input_ids"][:, view], mask[:, view])[0])
        assert torch.equal(trimmed, mask[:, view, :[9, 12][view]])
    assert torch.equal(normalize_uint8(uint8, boxes), expected)
    holes = mask.clone()
    holes[0, 0, 2] = 0
    with pytest.raises(ValueError, match="right-padded"):
        engine.batch_to_device({**batch, "attention_mask": holes}, torch.device("cpu"))


def test_trimming_text_padding_keeps_the_features():
    torch.manual_seed(0)
    model = modeling.TRPRModel.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16)).eval()
    input_ids = torch.randint(1, 49000, (3, 77))
    attention_mask = torch.zeros(3, 77, dtype=torch.long)
    for row, length in enumerate([9, 21, 5]):
        attention_mask[row, :length] = 1
        input_ids[row, 0], input_ids[row, length - 1], input_ids[row, length:] = 49406, 49407, 0
    trimmed_ids, trimmed_mask = engine.step.trim_text_padding(input_ids, attention_mask)
    assert trimmed_ids.shape == (3, 21) and torch.equal(trimmed_mask.sum(1), attention_mask.sum(1))
    with torch.no_grad():
        full, trimmed = model.encode_text(input_ids, attention_mask), model.encode_text(trimmed_ids, trimmed_mask)
    for a, b in zip(full, trimmed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_one_step_with_reference_image_tokens():
    config = tiny_config(**{"model.image_tokens": "reference", "optim.backbone_lr": 1e-3, "optim.warmup_epochs": 0})
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config, image_tokens="reference")
    loss = TrainingLoss.from_config(config["loss"])
    before = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator).tolist()
    after = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator).tolist()
    assert all(math.isfinite(b) for b in before) and after[0] < before[0] and after[1] < before[1]


def test_one_step_with_trl_trained_at_the_reference_temperature():
    config = tiny_config(**{"loss.lambda_sdm": 0.0, "loss.lambda_trl": 1.0, "loss.trl_temperature": "reference",
                            "optim.backbone_lr": 1e-3, "optim.warmup_epochs": 0})
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    loss = TrainingLoss.from_config(config["loss"])
    assert loss.terms[0].tau == config["loss"]["margin"] and loss.alr_term.tau == config["loss"]["tau"]
    before = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator).tolist()
    after = engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator).tolist()
    assert after[0] < before[0] and after[1] < before[1]


def test_backbone_lr_zero_freezes_the_backbone():
    """optim.backbone_lr 0 is accepted; build_pair freezes the backbone (no grads, no optimizer group) and a
    step changes the heads only."""
    from accelerate import Accelerator

    config = tiny_config(**{"optim.backbone_lr": 0.0, "model.backbone": "{" + ", ".join(
        f"{k}: {v}" for k, v in TINY_CLIP.items()) + "}", "model.head_seeds": "[0, 1]"})
    pair = engine.build_pair(config)
    assert not any(p.requires_grad for m in pair.models for n, p in m.named_parameters() if n.startswith("clip."))
    optimizers = [engine.build_optimizer(m, *optim_of(config))[0] for m in pair.models]
    assert [g["name"] for g in optimizers[0].param_groups] == ["heads"]
    assert engine.optim.current_lrs(optimizers[0]) == {"lr_backbone": 0.0, "lr_head": pytest.approx(1e-4)}
    _, _, _, batch, alr_state = _tiny_setup(config)
    before = {n: p.detach().clone() for n, p in pair.models[0].named_parameters()}
    loss = TrainingLoss.from_config(config["loss"])
    engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, Accelerator(cpu=True))
    for name, parameter in pair.models[0].named_parameters():
        assert parameter.grad is None or not name.startswith("clip.")
        changed = not torch.equal(parameter, before[name])
        assert changed == (not name.startswith("clip.")) or "token_norm" in name, name


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_head_warmup_schedule_and_frozen_backbone_steps():
    config = tiny_config(**{"optim.head_warmup_epochs": 2, "optim.warmup_epochs": 1, "optim.backbone_lr": 1e-3})
    # 4 epochs: 0, 1 head warm-up (backbone 0, heads full lr), then warm-up + cosine over the last 2 epochs
    backbone, heads = engine.optim.head_warmup_factors(4, RunConfig.from_dict(config).optim)
    assert [backbone(e) for e in range(4)] == [0.0, 0.0, pytest.approx(0.1), pytest.approx(1.0)]
    assert [heads(e) for e in range(4)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(1.0)]
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    optimizer, scheduler = engine.build_optimizer(pair.models[0], *optim_of(config))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"backbone": 0.0, "backbone_bias": 0.0, "heads": pytest.approx(1e-3)}
    for _ in range(2):
        scheduler.step()
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["backbone"] == pytest.approx(1e-4)
    # a head warm-up step: the backbone's gradients are dropped, so Adam leaves it and its state alone
    optimizers = [engine.build_optimizer(m, *optim_of(config))[0] for m in pair.models]
    before = {n: p.detach().clone() for n, p in pair.models[0].named_parameters()}
    loss = TrainingLoss.from_config(config["loss"])
    engine.reciprocal_step(list(pair.models), optimizers, on_device(batch), alr_state, loss, accelerator, freeze_backbone=True)
    for name, parameter in pair.models[0].named_parameters():
        if name.startswith("clip."):
            assert torch.equal(parameter, before[name]) and parameter not in optimizers[0].state, name
    assert not torch.equal(pair.models[0].image_head.token_fc1.weight, before["image_head.token_fc1.weight"])


def test_default_schedule_is_one_lambda_as_before():
    config = tiny_config()
    model = modeling.TRPRModel.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16))
    _, scheduler = engine.build_optimizer(model, *optim_of(config))
    assert len({id(f) for f in scheduler.lr_lambdas}) == 1  # head_warmup_epochs 0: one schedule, as before


def test_epoch_record_is_built_in_the_metrics_order():
    """engine.EpochRecord.as_dict: the metrics.jsonl line (keys in the order earlier runs wrote them); the
    background write's seconds go into a copy of "time", never into the record saved with last/."""
    steps = engine.step.EpochSteps(step=9, loss_a=1.5, loss_b=2.5, lr_backbone=1e-5, lr_head=1e-3, steps=3,
                              data_wait_s=0.1, compute_s=2.0)
    record = engine.EpochRecord(4, alr={"mu": 0.3}, steps=steps, val={"A/GE": {"R1": 10.0}}, best_epoch=4,
                                time={"epoch_s": 3.0, "compute_s": 2.0})
    saved = record.as_dict()
    assert list(saved) == ["epoch", "alr", "step", "loss_a", "loss_b", "lr_backbone", "lr_head", "val", "best_epoch",
                           "epoch_time_s", "time"]
    assert saved["time"] == {"epoch_s": 3.0, "compute_s": 2.0} and saved["epoch_time_s"] == 3.0
    appended = record.as_dict(checkpoint_write_s=0.123456)
    assert appended["time"]["checkpoint_write_s"] == 0.1235 and "checkpoint_write_s" not in record.time
    assert "alr" not in engine.EpochRecord(0, steps=steps, time={"epoch_s": 1.0}).as_dict()
    assert steps.step_times() == {"data_wait_s": 0.1, "compute_s": 2.0}
