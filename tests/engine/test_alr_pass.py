"""The ALR pass (trpr/engine/alr_pass.py, docs/method.md §4): shuffled batches of the training batch size,
each unique image and caption encoded once, losses from the training loss's own per_sample, the report
and the one ALR figure. (1 process vs 2 processes: tests/test_train_3rtpr.py.)"""
import json

import numpy as np
import pytest
import torch

from trpr import data
from trpr import engine
from trpr import kernels
from trpr import modeling
from trpr.configs import load_config
from trpr.data.tokenizer import get_tokenizer
from trpr.engine import alr_pass as alr_pass_module
from trpr.modeling.losses import TrainingLoss
from trpr.reporting import training as reporting

TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "projection_dim": 32}
BATCH = 20  # 144 captions: 7 full batches and one of 4, filled with 16 columns


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    """synth-pedes-tiny with 50% noisy correspondence: 144 captions of 72 images (2 per image, adjacent rows)."""
    return data.load_benchmark("synth-pedes-tiny", root=tmp_path_factory.mktemp("synth"), noise_rate=0.5)["train"]


def tiny_config(loss: str = "trl", **overrides):
    arguments = ["--data.dataset", "synth-pedes-tiny", "--data.image_size", "[32, 16]", "--data.num_workers", "0",
                 "--model.fused_dim", "48", "--train.batch_size", str(BATCH), "--eval.batch_size", "32",
                 "--seed", "3", "--loss.lambda_sdm", str(float(loss == "sdm")),
                 "--loss.lambda_trl", str(float(loss == "trl"))]
    for key, value in overrides.items():
        arguments += [f"--{key}", str(value)]
    return load_config(None, arguments)


def tiny_pair():
    torch.manual_seed(0)
    return modeling.ReciprocalPair.from_clip(modeling.small_clip_config(**TINY_CLIP), head_seeds=(0, 1),
                                             fused_dim=48, image_size=(32, 16))


def encode_each_sample(model, train_split, config, piece: int = 1):
    """Independent oracle for the features: every sample encoded on its own row (TrainViews without
    augmentation, full 77 tokens). Returns (text [N, D], image [N, D], pids [N]); piece 0: the global
    embeddings instead of the fused ones."""
    views = data.TrainViews(train_split, get_tokenizer(), config["data"]["image_size"], num_views=1, augment=False)
    items = [views[i] for i in range(len(views))]
    with torch.no_grad():
        model.eval()
        image = model.encode_image(torch.stack([item["pixel_values"][0] for item in items]))[piece]
        text = model.encode_text(torch.stack([item["input_ids"][0] for item in items]),
                                 torch.stack([item["attention_mask"][0] for item in items]))[piece]
        model.train()
    return text, image, torch.tensor([item["pid"] for item in items])


def per_sample_reference(features, loss: str, batches):
    """Each sample's loss within its batch, the kernel called directly. batches: [(members, scored)]."""
    text, image, pids = features
    losses = torch.full((len(pids),), float("nan"))
    for members, scored in batches:
        rows = members[:scored]
        columns = dict(text_cols=text[members], image_cols=image[members], col_pids=pids[members])
        if loss == "trl":
            losses[rows] = kernels.trl_loss(text[rows], image[rows], pids[rows], 0.015, 0.1, **columns)
        else:
            losses[rows] = kernels.sdm_loss(text[rows], image[rows], pids[rows], 50.0, **columns)
    return losses


def test_alr_batches_are_shuffled_full_and_score_every_sample_once():
    batches = engine.alr_batches(50, 8, seed=3, epoch=2)
    assert [len(members) for members, _ in batches] == [8] * 7  # the last batch is filled up to 8
    assert [scored for _, scored in batches] == [8] * 6 + [2]
    scored = torch.cat([members[:count] for members, count in batches])
    assert sorted(scored.tolist()) == list(range(50))  # every sample scored exactly once
    order = torch.cat([members for members, _ in batches[:-1]] + [batches[-1][0][:2]])
    assert torch.equal(batches[-1][0][2:], order[:6])  # filled with the first 6 of the permutation: columns only
    assert len(set(batches[-1][0].tolist())) == 8
    first = batches[0][0].tolist()
    assert first != sorted(first) and max(first) - min(first) > 8  # shuffled, not a run of consecutive rows
    # deterministic in (seed, epoch), a new order every epoch, and not the training order's stream
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, engine.alr_batches(50, 8, seed=3, epoch=2)))
    assert not torch.equal(engine.alr_batches(50, 8, seed=3, epoch=3)[0][0], batches[0][0])
    training = engine.sampler.GlobalBatchSampler(50, 8, rank=0, world_size=1, seed=3)
    training.set_epoch(2)
    assert next(iter(training)) != first
    # fewer samples than a batch: one batch of all of them
    (members, count), = engine.alr_batches(5, 8, seed=0, epoch=0)
    assert count == 5 and sorted(members.tolist()) == list(range(5))


@pytest.mark.parametrize("loss", ["trl", "sdm"])
def test_pass_scores_shuffled_batches_with_the_training_loss(train_split, monkeypatch, loss):
    """The losses handed to the mixture are each sample's loss within its shuffled batch of
    train.batch_size (not within a batch of consecutive rows, where an image's two captions would be
    each other's extra positive), from features of each unique image and caption encoded once."""
    from accelerate import Accelerator

    config = tiny_config(loss)
    pair = tiny_pair()
    captured = {}
    real_compute_alr = alr_pass_module.compute_alr

    def capture(losses_a, losses_b, diag_sims, **kwargs):
        captured.update(losses_a=losses_a, losses_b=losses_b, diag_sims=diag_sims, kwargs=kwargs)
        return real_compute_alr(losses_a, losses_b, diag_sims, **kwargs)

    monkeypatch.setattr(alr_pass_module, "compute_alr", capture)
    encoded = {"image": 0, "text": 0}
    for modality in encoded:
        for model in pair.models:
            original = getattr(model, f"encode_{modality}")

            def counting(*inputs, _original=original, _modality=modality):
                encoded[_modality] += len(inputs[0])
                return _original(*inputs)

            monkeypatch.setattr(model, f"encode_{modality}", counting)
    term = TrainingLoss.from_config(config["loss"]).alr_term
    alr = engine.AlrPass(train_split, get_tokenizer(), config, Accelerator(cpu=True))(list(pair.models), term, epoch=4)
    num_images = len(np.unique(train_split["image_id"]))
    assert encoded == {"image": 2 * num_images, "text": 2 * len(train_split)}  # once per model each
    monkeypatch.undo()
    batches = engine.alr_batches(len(train_split), BATCH, config["seed"], epoch=4)
    features = [encode_each_sample(model, train_split, config) for model in pair.models]
    for got, model_features in zip((captured["losses_a"], captured["losses_b"]), features):
        expected = per_sample_reference(model_features, loss, batches)
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-4)  # fp16-stored unit features
    sims = [torch.nn.functional.cosine_similarity(text, image, dim=-1) for text, image, _ in features]
    torch.testing.assert_close(captured["diag_sims"], (sims[0] + sims[1]) / 2, rtol=0, atol=2e-3)
    assert captured["kwargs"]["mixture"].max_iter == config["alr"]["gmm_max_iter"]
    assert alr.state.weights.shape == (len(train_split),) and alr.state.weights.dtype == torch.float32
    assert alr.state.keep.dtype == torch.bool
    assert all(model.training for model in pair.models)  # back in training mode
    # guard: batches of consecutive rows (an image's captions side by side) score differently here
    consecutive = [(torch.arange(start, start + BATCH), BATCH) for start in range(0, 140, BATCH)]
    old = per_sample_reference(features[0], loss, consecutive)
    assert (old[:140] - captured["losses_a"][:140]).abs().max() > 1e-2


def test_one_model_pass_and_persistent_loaders(train_split, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    with_workers = engine.AlrPass(train_split, get_tokenizer(), tiny_config("trl", **{"data.num_workers": 2}),
                                  accelerator)
    assert with_workers.image_loader.num_workers == 2 and with_workers.image_loader.persistent_workers
    config = tiny_config("trl", **{"alr.models": 1})
    captured = []
    real_compute_alr = alr_pass_module.compute_alr
    monkeypatch.setattr(alr_pass_module, "compute_alr",
                        lambda a, b, s, **k: captured.append(b) or real_compute_alr(a, b, s, **k))
    pair = tiny_pair()
    engine.AlrPass(train_split, get_tokenizer(), config, accelerator)(
        list(pair.models), TrainingLoss.from_config(config["loss"]).alr_term, epoch=1)
    assert captured == [None]  # alr.models 1: model A only


def _records(train_split, epochs):
    generator = torch.Generator().manual_seed(0)
    noisy = torch.tensor(train_split["noisy"])
    records = []
    for epoch in epochs:
        losses = torch.where(noisy, 2.0, 0.5) + 0.3 * torch.rand(len(noisy), generator=generator)
        sims = torch.where(noisy, 0.1, 0.6) + 0.1 * torch.rand(len(noisy), generator=generator)
        result = modeling.alr.compute_alr(losses, losses + 0.01, sims)
        records.append((epoch, result, sims))
    return noisy, records


def test_report_and_one_figure_over_the_epochs(train_split, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    noisy, records = _records(train_split, range(1, 4))
    for epoch, result, sims in records:
        alr = engine.alr_pass.AlrRound(engine.AlrState(result.weights, result.keep), result, sims)
        report = engine.report_alr(alr, noisy, epoch, accelerator, global_step=epoch)
        reporting.plot_run_alr_history(tmp_path, epoch, report)
        engine.append_metrics(tmp_path, {"epoch": epoch, "alr": report})
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["alr_weights.png"]  # one figure, rewritten
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["alr"]
    quantiles = last["weight_quantiles"]
    assert quantiles["levels"][0] == 0.0 and quantiles["levels"][-1] == 1.0
    assert set(quantiles) == {"levels", "all", "clean", "noisy"}
    assert quantiles["noisy"][3] < quantiles["clean"][3] <= 1.0  # noisy pairs' median weight is lower
    assert last["mixture"]["A"]["status"] == "ok" and last["noise_detection"]["f1"] > 90
    image = reporting.plot_alr_history([{"epoch": e, "alr": engine.alr_report(r, s, noisy)} for e, r, s in records],
                                    tmp_path / "again.png")
    assert image.ndim == 3 and image.shape[2] == 3 and (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    # without noisy flags: one group, no detection panel; old records without quantiles are skipped
    clean_only = [{"epoch": 0, "alr": {"mu": 0.1}}] + [
        {"epoch": e, "alr": engine.alr_report(r, s, torch.zeros_like(noisy))} for e, r, s in records]
    assert set(clean_only[-1]["alr"]["weight_quantiles"]) == {"levels", "all"}
    reporting.plot_alr_history(clean_only, tmp_path / "clean.png")


def test_degenerate_mixture_is_logged_and_recorded(train_split, tmp_path, capsys):
    from accelerate import Accelerator

    noisy = torch.tensor(train_split["noisy"])
    constant = torch.full((len(noisy),), 1.5)
    result = modeling.alr.compute_alr(constant, constant, torch.rand(len(noisy)))
    alr = engine.alr_pass.AlrRound(engine.AlrState(result.weights, result.keep), result, torch.rand(len(noisy)))
    report = engine.report_alr(alr, noisy, 2, Accelerator(cpu=True), global_step=0)
    for name in "AB":
        assert report["mixture"][name]["status"] == "constant_losses"
        assert "every sample clean" in report["mixture"][name]["rule"]
    assert report["mean_weight"] == 1.0 and report["consensus_counts"] == [0, 0, len(noisy)]
    assert "model A: degenerate mixture (constant_losses)" in capsys.readouterr().out


def _sharded_worker(rank: int, root: str, out_dir: str, port: int, views: str = "eval") -> None:
    """One of 2 CPU processes (gloo, through Accelerate): the pass over 143 captions / 72 images, so
    both shards are padded."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    statistics, state = _pass_on_odd_split(root, accelerator, views)
    torch.save({"statistics": statistics, "weights": state.weights, "keep": state.keep}, f"{out_dir}/rank{rank}.pt")
    accelerator.wait_for_everyone()


def _pass_on_odd_split(root, accelerator, views: str = "eval"):
    split = data.load_benchmark("synth-pedes-tiny", root=root, noise_rate=0.5)["train"]
    split = data.keep_rows(split, list(range(143)))
    config = tiny_config("trl", **{"alr.drop_noisy": True, "alr.views": views})  # keep flags of both values travel too
    pair = tiny_pair()
    alr_pass = engine.AlrPass(split, get_tokenizer(), config, accelerator)
    term = TrainingLoss.from_config(config["loss"], rank=accelerator.process_index,
                                    world_size=accelerator.num_processes).alr_term
    with torch.no_grad():
        for model in pair.models:
            model.eval()
        statistics = alr_pass.sample_statistics(list(pair.models), term, epoch=2)
        for model in pair.models:
            model.train()
    return statistics, alr_pass(list(pair.models), term, epoch=2).state.to("cpu")


@pytest.mark.parametrize("views", ["eval", "reference"])
def test_two_processes_give_the_one_process_pass(tmp_path, views):
    """Each process encodes a padded share (alr.views reference: of the samples' augmented views); the main
    process alone scores and fits; every process ends with the main process's weights and keep flags (bool
    throughout), equal to one process's."""
    import socket

    from accelerate import Accelerator

    root = str(tmp_path / "synth")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (losses, sims), state = _pass_on_odd_split(root, Accelerator(cpu=True), views)  # (generates the data once)
    torch.multiprocessing.start_processes(_sharded_worker, args=(root, str(tmp_path), port, views), nprocs=2,
                                          start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[1]["statistics"] is None  # scored on the main process only
    torch.testing.assert_close(ranks[0]["statistics"][0], losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["statistics"][1], sims, rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # identical on every process
    torch.testing.assert_close(ranks[0]["weights"], state.weights, rtol=1e-6, atol=1e-6)
    assert ranks[1]["keep"].dtype == torch.bool and torch.equal(ranks[0]["keep"], ranks[1]["keep"])
    assert torch.equal(ranks[0]["keep"], state.keep) and not state.keep.all()  # some pairs dropped


def test_reference_selection_in_the_pass_is_seeded_per_epoch(train_split):
    """alr.selection reference: hard keep flags (c = 2, c = 1 on a coin of (seed, epoch)), every weight 1."""
    from accelerate import Accelerator

    from trpr.modeling.alr import reference_selection

    config = tiny_config("trl", **{"alr.selection": "reference"})
    pair = tiny_pair()
    alr_pass = engine.AlrPass(train_split, get_tokenizer(), config, Accelerator(cpu=True))
    term = TrainingLoss.from_config(config["loss"]).alr_term
    alr = alr_pass(list(pair.models), term, epoch=2)
    consensus = alr.result.consensus
    assert torch.equal(alr.state.keep, reference_selection(consensus, alr_pass_module.coin_seed(3, 2)))
    assert torch.all(alr.state.weights == 1.0)
    assert alr_pass_module.coin_seed(3, 2) != alr_pass_module.coin_seed(3, 3)


def test_pass_can_score_the_global_similarity(train_split, monkeypatch):
    """alr.score global: the losses and diagonal similarities handed to the mixture are those of the global
    embeddings (each sample within its shuffled batch), not of the fused ones."""
    from accelerate import Accelerator

    config = tiny_config("trl", **{"alr.score": "global"})
    pair = tiny_pair()
    captured = {}
    real_compute_alr = alr_pass_module.compute_alr
    monkeypatch.setattr(alr_pass_module, "compute_alr",
                        lambda a, b, s, **k: captured.update(a=a, b=b, s=s) or real_compute_alr(a, b, s, **k))
    term = TrainingLoss.from_config(config["loss"]).alr_term
    engine.AlrPass(train_split, get_tokenizer(), config, Accelerator(cpu=True))(list(pair.models), term, epoch=1)
    monkeypatch.undo()
    batches = engine.alr_batches(len(train_split), BATCH, config["seed"], epoch=1)
    features = [encode_each_sample(model, train_split, config, piece=0) for model in pair.models]
    assert features[0][0].shape[1] == pair.models[0].embed_dim != pair.models[0].output_dim
    for got, model_features in zip((captured["a"], captured["b"]), features):
        torch.testing.assert_close(got, per_sample_reference(model_features, "trl", batches), rtol=2e-3, atol=2e-4)
    sims = [torch.nn.functional.cosine_similarity(text, image, dim=-1) for text, image, _ in features]
    torch.testing.assert_close(captured["s"], (sims[0] + sims[1]) / 2, rtol=0, atol=2e-3)


def test_pass_fits_the_mixture_of_the_gmm_preset(train_split, monkeypatch):
    from accelerate import Accelerator

    config = tiny_config("trl", **{"alr.gmm_preset": "reference", "alr.mu_floor": "reference"})
    captured = {}
    real_compute_alr = alr_pass_module.compute_alr
    monkeypatch.setattr(alr_pass_module, "compute_alr",
                        lambda a, b, s, **k: captured.update(k) or real_compute_alr(a, b, s, **k))
    term = TrainingLoss.from_config(config["loss"]).alr_term
    engine.AlrPass(train_split, get_tokenizer(), config, Accelerator(cpu=True))(list(tiny_pair().models), term, epoch=1)
    mixture = captured["mixture"]
    assert (mixture.max_iter, mixture.tol, mixture.reg_covar) == (10, 1e-2, 5e-4)  # synth-pedes: not RSTPReid
    assert captured["mu_floor"] == "reference" and captured["selection"] == "project"


def test_separation_auc_is_the_mann_whitney_statistic_with_ties_counted_half():
    """Hand-computed: noisy scores {0.4, 0.8} against clean {0.1, 0.4, 0.2}: of the 6 (noisy, clean) pairs
    5 rank the noisy one higher and one ties (0.4 vs 0.4, counted 1/2): AUC 5.5 / 6."""
    score = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.2])
    noisy = torch.tensor([False, True, False, True, False])
    assert alr_pass_module.separation_auc(score, noisy) == pytest.approx(5.5 / 6)
    assert alr_pass_module.separation_auc(-score, noisy) == pytest.approx(0.5 / 6)  # the mirror
    assert alr_pass_module.separation_auc(torch.ones(5), noisy) == pytest.approx(0.5)  # all tied: no information
    perfect = torch.tensor([0.0, 2.0, 1.0, 3.0, 0.5], dtype=torch.float16)  # any float dtype
    assert alr_pass_module.separation_auc(perfect, noisy) == 1.0


def test_report_records_model_as_separation_auc_of_each_signal(train_split):
    """alr_report with the pass's signals: model A's AUC of its loss (higher = noisy) and of its negated
    fused / global diagonal cosine; without signals (or without clean pairs) none is recorded."""
    noisy, records = _records(train_split, range(1, 2))
    _, result, sims = records[0]
    generator = torch.Generator().manual_seed(0)
    loss = torch.rand(len(noisy), generator=generator) + noisy.float()  # separates the noisy pairs perfectly
    global_sims = torch.rand(len(noisy), generator=generator)
    report = engine.alr_report(result, sims, noisy, {"loss": loss, "fused_similarity": sims,
                                                     "global_similarity": global_sims})
    auc = report["separation_auc"]
    assert auc["loss"] == 1.0
    assert auc["fused_similarity"] == pytest.approx(alr_pass_module.separation_auc(-sims, noisy))
    assert auc["global_similarity"] == pytest.approx(alr_pass_module.separation_auc(-global_sims, noisy))
    assert "separation_auc" not in engine.alr_report(result, sims, noisy)
    assert "separation_auc" not in engine.alr_report(result, sims, torch.ones_like(noisy), {"loss": loss,
                                                     "fused_similarity": sims, "global_similarity": global_sims})


class ViewStub(torch.nn.Module):
    """A hand-checkable encoder pair member: image -> fixed linear maps of the flattened pixels, text -> fixed
    linear maps of the mask-weighted sum of per-token embeddings (so trimming the padding changes nothing).
    Returns (global [b, 6], fused [b, 8]) like TRPRModel; `seed` makes two different stubs."""

    embed_dim, output_dim = 6, 8

    def __init__(self, seed: int, image_size=(32, 16), vocab: int = 49408):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        width = 3 * image_size[0] * image_size[1]
        self.image_global = torch.nn.Parameter(torch.randn(width, 6, generator=generator), requires_grad=False)
        self.image_fused = torch.nn.Parameter(torch.randn(width, 8, generator=generator), requires_grad=False)
        self.tokens = torch.nn.Parameter(torch.randn(vocab, 8, generator=generator), requires_grad=False)
        self.text_global = torch.nn.Parameter(torch.randn(8, 6, generator=generator), requires_grad=False)

    def encode_image(self, pixels):
        flat = pixels.float().flatten(1)
        return flat @ self.image_global, flat @ self.image_fused

    def encode_text(self, input_ids, attention_mask):
        fused = (self.tokens[input_ids] * attention_mask[..., None].float()).sum(1)
        return fused @ self.text_global, fused


def stub_features(model, views, epoch: int, view: int):
    """Oracle of alr.views reference: model's (text [N, 8], image [N, 8]) fused features of view `view` of
    every sample, each item drawn by hand from `views` (TrainViews on the pass's stream) with key (epoch, i)."""
    items = [views[(epoch, i)] for i in range(len(views))]
    with torch.no_grad():
        image = model.encode_image(torch.stack([item["pixel_values"][view] for item in items]))[1]
        text = model.encode_text(torch.stack([item["input_ids"][view] for item in items]),
                                 torch.stack([item["attention_mask"][view] for item in items]))[1]
    return text, image, torch.tensor([item["pid"] for item in items])


def test_eval_views_are_the_default_and_build_no_view_loader(train_split):
    from accelerate import Accelerator

    config = tiny_config("trl")
    assert config["alr"]["views"] == "eval"
    alr_pass = engine.AlrPass(train_split, get_tokenizer(), config, Accelerator(cpu=True))
    assert not hasattr(alr_pass, "view_loader") and torch.equal(alr_pass.sample_image, alr_pass.image_of)


def test_reference_views_score_each_model_on_the_other_models_augmented_view(train_split, monkeypatch):
    """alr.views reference: model A is scored on view b and model B on view a of each sample's two
    training-augmented views (image AND caption), drawn from (seed, epoch) on the pass's own stream; every
    sample has its own image row; the losses are those of the shuffled ALR batches. Checked against the
    views drawn by hand from data.TrainViews(stream=ALR_VIEW_STREAM)."""
    from accelerate import Accelerator

    config = tiny_config("trl", **{"alr.views": "reference"})
    stub_a, stub_b = ViewStub(11), ViewStub(12)
    alr_pass = engine.AlrPass(train_split, get_tokenizer(), config, Accelerator(cpu=True))
    assert not hasattr(alr_pass, "image_loader")
    assert torch.equal(alr_pass.sample_image, torch.arange(len(train_split)))  # no sharing per image_id
    views = data.TrainViews(train_split, get_tokenizer(), config["data"]["image_size"], num_views=2, augment=True,
                            seed=config["seed"], stream=alr_pass_module.ALR_VIEW_STREAM)
    oracle = {(name, view): stub_features(model, views, 4, view)
              for name, model in (("A", stub_a), ("B", stub_b)) for view in (0, 1)}
    normalize = torch.nn.functional.normalize

    def assert_features(got, expected):
        torch.testing.assert_close(got[0].float(), normalize(expected[0], dim=-1), rtol=0, atol=1e-3)  # fp16
        torch.testing.assert_close(got[1].float(), normalize(expected[1], dim=-1), rtol=0, atol=1e-3)

    # the features: A on view b (1), B on view a (0); not the other way round
    got_a, got_b = (pieces["fused"] for pieces in alr_pass.encode([stub_a, stub_b], ("fused",), epoch=4))
    assert_features(got_a, oracle["A", 1])
    assert_features(got_b, oracle["B", 0])
    assert (got_a[1].float() - normalize(oracle["A", 0][1], dim=-1)).abs().max() > 0.1  # view a is another draw
    assert (got_a[0].float() - normalize(oracle["A", 0][0], dim=-1)).abs().max() > 0.01  # caption augmented too
    # swapped models: the first scored model still takes view b, the second view a
    swapped_b, swapped_a = (pieces["fused"] for pieces in alr_pass.encode([stub_b, stub_a], ("fused",), epoch=4))
    assert_features(swapped_b, oracle["B", 1])
    assert_features(swapped_a, oracle["A", 0])
    with pytest.raises(ValueError, match="pass epoch"):
        alr_pass.encode([stub_a, stub_b])

    # the whole pass: per-sample losses of those features within the shuffled ALR batches
    captured = []
    real_compute_alr = alr_pass_module.compute_alr
    monkeypatch.setattr(alr_pass_module, "compute_alr",
                        lambda a, b, s, **k: captured.append((a, b, s)) or real_compute_alr(a, b, s, **k))
    term = TrainingLoss.from_config(config["loss"]).alr_term
    alr_pass([stub_a, stub_b], term, epoch=4)
    alr_pass([stub_b, stub_a], term, epoch=4)
    alr_pass([stub_a, stub_b], term, epoch=4)
    alr_pass([stub_a, stub_b], term, epoch=5)
    batches = engine.alr_batches(len(train_split), BATCH, config["seed"], epoch=4)
    expected = {key: per_sample_reference(features, "trl", batches) for key, features in oracle.items()}
    (losses_a, losses_b, sims), (swapped_first, swapped_second, _), again, other_epoch = captured
    torch.testing.assert_close(losses_a, expected["A", 1], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(losses_b, expected["B", 0], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(swapped_first, expected["B", 1], rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(swapped_second, expected["A", 0], rtol=2e-3, atol=2e-4)
    assert (losses_a - expected["A", 0]).abs().max() > 1e-2  # not model A on its own view
    cosine = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(sims, (cosine(*oracle["A", 1][:2], dim=-1) + cosine(*oracle["B", 0][:2], dim=-1)) / 2,
                               rtol=0, atol=2e-3)
    # deterministic in (seed, epoch); new views (and batches) in another epoch
    assert all(torch.equal(x, y) for x, y in zip(captured[0], again))
    assert not torch.equal(other_epoch[0], losses_a)
    epoch_5 = alr_pass.encode([stub_a], ("fused",), epoch=5)[0]["fused"]
    assert_features(epoch_5, stub_features(stub_a, views, 5, 1)[:2])
    assert (epoch_5[1].float() - got_a[1].float()).abs().max() > 0.1
    # the pass's stream is not the training views' stream (same seed, epoch and sample)
    training = data.TrainViews(train_split, get_tokenizer(), config["data"]["image_size"], num_views=2,
                               augment=True, seed=config["seed"])
    assert not torch.equal(training[(4, 0)]["pixel_values"], views[(4, 0)]["pixel_values"])


def test_reference_views_do_not_depend_on_the_workers(train_split):
    """alr.views reference: 2 persistent loader workers draw the same views as none, in each of two epochs
    (the keys carry the epoch, so the workers' dataset copies need no set_epoch)."""
    from accelerate import Accelerator

    stub_a, stub_b = ViewStub(11), ViewStub(12)
    passes = [engine.AlrPass(train_split, get_tokenizer(),
                             tiny_config("trl", **{"alr.views": "reference", "data.num_workers": workers}),
                             Accelerator(cpu=True)) for workers in (0, 2)]
    assert passes[1].view_loader.num_workers == 2 and passes[1].view_loader.persistent_workers
    for epoch in (1, 2):
        inline, workers = (alr_pass.encode([stub_a, stub_b], ("fused", "global"), epoch) for alr_pass in passes)
        for got, expected in zip(workers, inline):
            assert all(torch.equal(x, y) for piece in expected for x, y in zip(got[piece], expected[piece]))


def test_hard_selection_report_and_figure_show_the_kept_pairs_per_group(train_split, tmp_path, monkeypatch):
    """Under hard selection every weight is 1: the report gives the kept share of clean and of noisy pairs
    (h averaged per group, checked by hand) and the figure's left panel draws those shares, not the weights."""
    from trpr.reporting import training as training_figures

    noisy = torch.tensor(train_split["noisy"])
    generator = torch.Generator().manual_seed(1)
    losses = torch.where(noisy, 2.0, 0.5) + 0.3 * torch.rand(len(noisy), generator=generator)
    sims = torch.where(noisy, 0.1, 0.6)
    result = modeling.alr.compute_alr(losses, losses + 0.01, sims, selection="reference", seed=3)
    report = engine.alr_report(result, sims, noisy)
    keep = result.keep.bool()
    assert report["mean_weight"] == 1.0 and report["kept_fraction"] < 1.0
    assert report["kept_fraction_noisy"] == pytest.approx(keep[noisy].sum().item() / noisy.sum().item())
    assert report["kept_fraction_clean"] == pytest.approx(keep[~noisy].sum().item() / (~noisy).sum().item())
    assert report["kept_fraction_noisy"] < 0.2 < 0.8 < report["kept_fraction_clean"]
    drawn = []
    real = training_figures.plot_kept_fractions
    monkeypatch.setattr(training_figures, "plot_kept_fractions",
                        lambda axis, records, epochs, groups: drawn.append(groups) or real(axis, records, epochs, groups))
    reporting.plot_alr_history([{"epoch": 1, "alr": report}], tmp_path / "hard.png")
    assert drawn == [["clean", "noisy"]] and (tmp_path / "hard.png").read_bytes()[:4] == b"\x89PNG"
    soft = modeling.alr.compute_alr(losses, losses + 0.01, sims)  # every pair kept: the weights panel
    reporting.plot_alr_history([{"epoch": 1, "alr": engine.alr_report(soft, sims, noisy)}], tmp_path / "soft.png")
    assert len(drawn) == 1
