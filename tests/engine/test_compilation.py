"""train.compile: regional compilation of the encoder layers (engine.compilation) runs the trainer's step
with the same numbers; the config values and their resolution per device."""
import pytest
import torch

from trpr import configs
from trpr import engine
from trpr import modeling
from trpr.benchmarks.train_throughput import synthetic_batch
from trpr.modeling.backbone import SDPAEncoderLayer
from trpr.modeling.losses import TrainingLoss

TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "projection_dim": 32}


def optim_of(config: dict) -> tuple:
    """(optim section, train.epochs): what engine.build_optimizer(s) takes from a config."""
    settings = configs.RunConfig.from_dict(config)
    return settings.optim, settings.train.epochs


def test_compile_modes_resolve_per_device():
    assert engine.resolve_compile_mode("auto", "cpu") == "off"
    assert engine.resolve_compile_mode("auto", torch.device("cuda")) == "regional"
    assert engine.resolve_compile_mode(False, "cuda") == "off" == engine.resolve_compile_mode("off", "cuda")
    assert engine.resolve_compile_mode("full", "cpu") == "full"
    with pytest.raises(ValueError, match="train.compile"):
        engine.resolve_compile_mode("max-autotune", "cpu")
    assert configs.load_config(None)["train"]["compile"] == "auto"
    assert configs.load_config(None, ["--train.compile", "false"])["train"]["compile"] is False
    assert configs.load_config(None, ["--train.compile", "regional"])["train"]["compile"] == "regional"
    for bad in ("true", "fast"):
        with pytest.raises(configs.ConfigError, match="train.compile must be"):
            configs.load_config(None, ["--train.compile", bad])


def _setup(config):
    torch.manual_seed(0)
    pair = modeling.ReciprocalPair.from_clip(modeling.small_clip_config(**TINY_CLIP), fused_dim=64, image_size=(32, 16))
    for model in pair.models:
        model.clip.check_text_padding = False
    return pair, [engine.build_optimizer(model, *optim_of(config))[0] for model in pair.models]


def _batches():
    """Two batches whose longest captions differ (the trimmed text length changes between steps)."""
    batches = []
    for seed, length in ((0, 41), (1, 23)):
        batch = synthetic_batch(8, (32, 16), seed=seed)
        mask = batch["attention_mask"]
        mask[:, :, length:] = 0
        batch["input_ids"] = batch["input_ids"] * mask
        batch["input_ids"][:, :, length - 1] = modeling.clip_configs.EOT_TOKEN_ID
        batches.append(engine.batch_to_device(batch, "cpu"))
    return batches


def test_regional_compile_runs_the_step_with_the_eager_numbers(tmp_path):
    """Every SDPAEncoderLayer is compiled (names and checkpoints unchanged); two steps whose text lengths
    differ give the eager step's losses and weights. Backend aot_eager: dynamo capture + AOT autograd
    without code generation (Inductor's CPU code generation takes minutes on a small CI machine; the GPU
    check runs Inductor on CUDA, and `python -m trpr.benchmarks.train_throughput --compile off,regional`
    runs it on either)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    config = configs.load_config(None, ["--model.fused_dim", "64", "--data.image_size", "[32, 16]",
                                        "--optim.warmup_epochs", "0", "--optim.backbone_lr", "1e-3"])
    loss = TrainingLoss.from_config(config["loss"])
    alr_state = engine.AlrState.initial(8, "cpu")
    results = {}
    for mode in ("off", "regional"):
        pair, optimizers = _setup(config)
        names = list(pair.state_dict())
        counts = [engine.compile_model(model, mode, backend="aot_eager") for model in pair.models]
        assert list(pair.state_dict()) == names
        if mode == "regional":
            layers = [m for m in pair.a.modules() if isinstance(m, SDPAEncoderLayer)]
            assert counts == [4, 4] and len(layers) == 4
            assert all(layer._compiled_call_impl is not None for layer in layers)
        losses = [engine.reciprocal_step(list(pair.models), optimizers, batch, alr_state, loss, accelerator)
                  for batch in _batches()]
        results[mode] = (torch.stack(losses), {k: v.clone() for k, v in pair.state_dict().items()})
    # the checkpoint writer's host twin of a compiled pair saves the weights under their usual names
    writer = engine.CheckpointWriter(tmp_path, pair, optimizers, [], accelerator, background=False)
    writer._copy_pair().save_pretrained(tmp_path / "twin")
    saved = modeling.ReciprocalPair.from_pretrained(tmp_path / "twin").state_dict()
    assert saved.keys() == results["regional"][1].keys()
    assert all(torch.equal(saved[name], value) for name, value in results["regional"][1].items())
    torch.testing.assert_close(results["regional"][0], results["off"][0], rtol=1e-6, atol=1e-6)
    for name, value in results["off"][1].items():
        torch.testing.assert_close(results["regional"][1][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- TF32 scoping (issue 24)
def test_matmul_precision_is_scoped_and_restored():
    from trpr.kernels.precision import exact_float32, matmul_precision

    before = torch.get_float32_matmul_precision()
    with matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
        with exact_float32():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(RuntimeError), exact_float32():
            raise RuntimeError("restored on errors too")
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="highest"):
        with matmul_precision("tf32"):
            pass
    # fast math is a scope on CUDA and nothing on the CPU: never a process-wide setting
    with engine.compilation.fast_math("cpu"):
        assert torch.get_float32_matmul_precision() == before


def test_triton_loss_slabs_run_exact_under_a_callers_tf32(monkeypatch):
    """The slab products (forward and backward) see "highest" although the caller set "high"."""
    from trpr import kernels
    from trpr.kernels import slab
    from trpr.kernels.precision import matmul_precision

    seen = []
    real = slab.matmul_fp32

    def spy(a, b):
        seen.append(torch.get_float32_matmul_precision())
        return real(a, b)

    monkeypatch.setattr(slab, "matmul_fp32", spy)
    text = torch.randn(8, 16, requires_grad=True)
    image = torch.randn(8, 16, requires_grad=True)
    pids = torch.arange(8) // 2
    with matmul_precision("high"):
        kernels.sdm_loss(text, image, pids, backend="triton").sum().backward()
        assert torch.get_float32_matmul_precision() == "high"
    assert len(seen) >= 3 and set(seen) == {"highest"}, seen      # forward slab + backward slab + dR


def test_trainer_validation_equals_eval_cli_with_fast_math_on(tmp_path, monkeypatch):
    """A 1-epoch tiny run with the trainer's fast math forced on (as on CUDA): the model forward sees
    "high", every loss and retrieval call sees "highest", the process-wide setting is back to its value
    after the run, and eval_3rtpr.py on best/ reproduces the validation metrics exactly."""
    import json

    import eval_3rtpr
    import train_3rtpr
    from trpr import kernels
    from trpr.engine import compilation
    from trpr.modeling.model import TRPRModel

    monkeypatch.setattr(compilation, "fast_math_enabled", lambda device: True)
    seen = {"forward": set(), "loss": set(), "retrieval": set()}

    def spying(name, function):
        def wrapped(*args, **kwargs):
            seen[name].add(torch.get_float32_matmul_precision())
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(TRPRModel, "forward", spying("forward", TRPRModel.forward))
    monkeypatch.setattr(kernels, "sdm_loss_reference", spying("loss", kernels.sdm_loss_reference))
    monkeypatch.setattr(kernels, "trl_loss_reference", spying("loss", kernels.trl_loss_reference))
    monkeypatch.setattr(kernels, "retrieval_metrics_reference", spying("retrieval", kernels.retrieval_metrics_reference))
    before = torch.get_float32_matmul_precision()
    tiny = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, projection_dim: 32}"
    run_dir = tmp_path / "run"
    train_3rtpr.main(["--config", "synth-pedes", "--data.dataset", "synth-pedes-tiny", "--data.root",
                      str(tmp_path / "data"), "--train.epochs", "1", "--train.batch_size", "48",
                      "--data.image_size", "[32, 16]", "--model.fused_dim", "64", "--model.backbone", tiny,
                      "--logging.trackers", "[]", "--data.num_workers", "0", "--output-dir", str(run_dir)])
    assert torch.get_float32_matmul_precision() == before
    assert seen["forward"] == {"high"} and seen["loss"] == {"highest"} and seen["retrieval"] == {"highest"}, seen
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    validation = record["val"]
    assert eval_3rtpr.main(["--checkpoint", str(run_dir), "--dataset", "synth-pedes-tiny", "--root",
                            str(tmp_path / "data"), "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["checkpoints"][0]["rows"]
    assert len(validation) == 9 and {key: rows[key] for key in validation} == validation
