"""engine building blocks: batches, schedule, parameter groups, one reciprocal step."""
import math

import pytest
import torch

import engine
import kernels
import modeling
from configs import load_config
from modeling.losses import TrainingLoss

TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "projection_dim": 32}


def tiny_config(**sections):
    overrides = ["--model.fused_dim", "64", "--data.image_size", "[32, 16]", "--train.epochs", "4"]
    for key, value in sections.items():
        overrides += [f"--{key}", str(value)]
    return load_config(None, overrides)


def test_global_batches_are_split_evenly_and_agree_with_one_process():
    one = engine.GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=3)
    two = [engine.GlobalBatchSampler(50, 8, rank=r, world_size=2, seed=3) for r in range(2)]
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
        engine.GlobalBatchSampler(50, 9, rank=0, world_size=2, seed=0)
    with pytest.raises(ValueError, match="exceeds the training set"):
        engine.GlobalBatchSampler(5, 8, rank=0, world_size=1, seed=0)


def test_lr_schedule_warmup_then_cosine():
    factors = [engine.lr_factor(e, epochs=60, warmup_epochs=5, warmup_factor=0.1) for e in range(60)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[1] == pytest.approx(0.1 + 0.9 / 5)
    assert factors[5] == pytest.approx(1.0)
    assert factors[5 + 55 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 27 / 55)))
    assert factors[59] < 0.01 and all(a >= b for a, b in zip(factors[5:], factors[6:]))


def test_param_groups_follow_the_recipe():
    config = tiny_config()
    model = modeling.TRPRModel.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16))
    groups = {g["name"]: g for g in engine.param_groups(model, config["optim"])}
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (1e-5, 4e-5)
    assert (groups["backbone_bias"]["lr"], groups["backbone_bias"]["weight_decay"]) == (2e-5, 0.0)
    assert (groups["heads"]["lr"], groups["heads"]["weight_decay"]) == (1e-3, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("clip.") and names[id(p)].endswith("bias") for p in groups["backbone_bias"]["params"])
    assert all(not names[id(p)].startswith("clip.") for p in groups["heads"]["params"])
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in model.parameters() if p.requires_grad)  # frozen patch conv left out
    optimizer, scheduler = engine.build_optimizer(model, config)
    assert optimizer.defaults["eps"] == 1e-3 and optimizer.defaults["betas"] == (0.9, 0.999)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # warm-up starts at 0.1x


def _tiny_setup(config):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    pair = modeling.ReciprocalPair.from_clip(modeling.small_clip_config(**TINY_CLIP), head_seeds=(0, 1),
                                             fused_dim=64, image_size=(32, 16))
    optimizers = [engine.build_optimizer(m, config)[0] for m in pair.models]
    generator = torch.Generator().manual_seed(1)
    batch = {"index": torch.arange(8), "pid": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
             "pixel_values": torch.randn(8, 2, 3, 32, 16, generator=generator),
             "input_ids": torch.randint(1, 49000, (8, 2, 77), generator=generator),
             "attention_mask": torch.zeros(8, 2, 77, dtype=torch.long)}
    batch["attention_mask"][:, :, :12] = 1
    batch["input_ids"][:, :, 0] = 49406
    batch["input_ids"][:, :, 11] = 49407
    alr_state = {"weights": torch.ones(8), "keep": torch.ones(8, dtype=torch.bool)}
    return accelerator, pair, optimizers, batch, alr_state


@pytest.mark.parametrize("loss", ["sdm", "trl"])
def test_one_step_lowers_both_losses(loss):
    config = tiny_config(**{"loss.lambda_sdm": float(loss == "sdm"), "loss.lambda_trl": float(loss == "trl"),
                            "optim.backbone_lr": 1e-3, "optim.warmup_epochs": 0})
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    loss = TrainingLoss.from_config(config["loss"])
    before = engine.reciprocal_step(list(pair.models), optimizers, batch, alr_state, loss, accelerator)
    after = engine.reciprocal_step(list(pair.models), optimizers, batch, alr_state, loss, accelerator)
    assert before[0] != before[1]  # different heads, different views
    assert after[0] < before[0] and after[1] < before[1]


def test_weights_and_keep_flags_enter_the_loss():
    config = tiny_config(**{"optim.backbone_lr": 0.0, "optim.head_lr": 0.0})
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    loss = TrainingLoss.from_config(config["loss"])
    base = engine.reciprocal_step(list(pair.models), optimizers, batch, alr_state, loss, accelerator)
    half = {"weights": torch.full((8,), 0.5), "keep": torch.ones(8, dtype=torch.bool)}
    halved = engine.reciprocal_step(list(pair.models), optimizers, batch, half, loss, accelerator)
    assert halved == pytest.approx([0.5 * b for b in base], rel=1e-4)  # sum(h w l) / sum(h)
    dropped = {"weights": torch.ones(8), "keep": torch.arange(8) < 4}
    partial = engine.reciprocal_step(list(pair.models), optimizers, batch, dropped, loss, accelerator)
    assert all(p != pytest.approx(b, rel=1e-3) for p, b in zip(partial, base))  # mean over kept samples only


def test_non_finite_loss_stops_with_the_step(monkeypatch):
    config = tiny_config()
    accelerator, pair, optimizers, batch, alr_state = _tiny_setup(config)
    loss = TrainingLoss.from_config(config["loss"])
    before = [p.detach().clone() for p in pair.a.parameters()]
    monkeypatch.setattr(kernels, "sdm_loss", lambda t, i, *a, **k: (t.sum(-1) + i.sum(-1)) * float("nan"))
    with pytest.raises(engine.TrainingDiverged, match="model A at epoch 3, step 7"):
        engine.reciprocal_step(list(pair.models), optimizers, batch, alr_state, loss, accelerator,
                                    where="epoch 3, step 7")
    assert all(torch.equal(a, b) for a, b in zip(before, pair.a.parameters()))  # no optimizer step


def test_trimming_text_padding_keeps_the_features():
    torch.manual_seed(0)
    model = modeling.TRPRModel.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16)).eval()
    input_ids = torch.randint(1, 49000, (3, 77))
    attention_mask = torch.zeros(3, 77, dtype=torch.long)
    for row, length in enumerate([9, 21, 5]):
        attention_mask[row, :length] = 1
        input_ids[row, 0], input_ids[row, length - 1], input_ids[row, length:] = 49406, 49407, 0
    trimmed_ids, trimmed_mask = engine.trim_text_padding(input_ids, attention_mask)
    assert trimmed_ids.shape == (3, 21) and torch.equal(trimmed_mask.sum(1), attention_mask.sum(1))
    with torch.no_grad():
        full, trimmed = model.encode_text(input_ids, attention_mask), model.encode_text(trimmed_ids, trimmed_mask)
    for a, b in zip(full, trimmed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
