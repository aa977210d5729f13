"""trpr.experiments.proxy_pretrain (scripts/pretrain_proxy.py) at tiny scale: the CLIP loss, resumable pre-training, the saved transformers CLIP
folder (HF-loadable, same features as the project's backbone), the cache, and fine-tuning from it through the
trainer's command line (position embeddings resized to the fine-tuning grid, the proxy's weights loaded)."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizerFast

from trpr import configs
from trpr.data.proxy_corpus import CorpusSpec, ensure_corpus, load_corpus
from trpr.data.tokenizer import get_tokenizer, tokenize
from trpr.modeling import TRPRModel
from trpr.modeling.backbone import CLIPBackbone, load_clip_model, resize_position_embedding

from trpr.experiments import proxy_pretrain as pretrain_proxy

ROOT = Path(__file__).resolve().parents[2]

TINY = pretrain_proxy.ProxySettings(
    width=32, vision_layers=1, text_layers=1, heads=2, mlp_ratio=2, patch=8, epochs=2, batch_size=8, lr=1e-3,
    corpus=CorpusSpec(train_ids=10, heldout_ids=4, images_per_id=2, captions_per_image=2, image_size=32, seed=3))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def proxy(root):
    return pretrain_proxy.build_proxy(TINY, root, benchmark_size=(32, 16), benchmark="synth-pedes-tiny",
                                      progress=False)


def test_clip_loss_is_symmetric_infonce_with_the_learned_scale():
    torch.manual_seed(0)
    image, text = torch.randn(6, 5), torch.randn(6, 5)
    scale = torch.tensor(math.log(20.0))
    logits = 20.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    i2t = -logits.log_softmax(dim=1).diagonal().mean()
    t2i = -logits.log_softmax(dim=0).diagonal().mean()
    torch.testing.assert_close(pretrain_proxy.clip_loss(image, text, scale), (i2t + t2i) / 2)
    # perfectly aligned, well separated pairs at a high scale: loss near 0
    assert pretrain_proxy.clip_loss(torch.eye(5), torch.eye(5), torch.tensor(math.log(100.0))) < 1e-3


def test_learning_rate_warms_up_then_decays_to_zero():
    settings = replace(TINY, lr=1.0, warmup_fraction=0.1)
    rates = [pretrain_proxy.lr_at(step, 100, settings) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 1e-3


def test_folder_name_encodes_the_settings(root):
    name = TINY.folder_name()
    assert name.startswith("PROXY-CLIP-w32-l1x1-p8-32px-ids10-e2-seed0-")
    assert replace(TINY, lr=2e-3).folder_name() != name  # every setting is in the hash
    assert replace(TINY, corpus=replace(TINY.corpus, seed=4)).folder_name() != name
    assert pretrain_proxy.proxy_folder(TINY, root) == Path(root).absolute() / name


def projected(features):
    """get_*_features returns the tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def test_saved_folder_is_a_transformers_clip_with_the_backbones_features(proxy):
    for name in ("config.json", "model.safetensors", "pretrain_info.json", "loss_curve.png", "tokenizer.json"):
        assert (proxy / name).is_file(), name
    info = json.loads((proxy / "pretrain_info.json").read_text())
    assert info["steps"] == 2 * info["steps_per_epoch"] == 2 * (20 // 8) and info["cpu_time_s"] > 0
    assert set(info["zero_shot"]) == {"heldout_corpus", "synth-pedes-tiny_test_32x16"}
    assert all(0 <= m["R1"] <= m["R10"] <= 100 for m in info["zero_shot"].values())
    hf = CLIPModel.from_pretrained(proxy).eval()
    ours = CLIPBackbone(load_clip_model(proxy), (32, 32)).eval()
    assert hf.config.vision_config.image_size == 32  # square pre-training size
    pixels = torch.randn(3, 3, 32, 32)
    captions = ["red coat, black jeans", "photo of a woman with a pink handbag", "grey tee"]
    ids, mask = tokenize(get_tokenizer(), captions)
    with torch.no_grad():
        torch.testing.assert_close(projected(hf.get_image_features(pixel_values=pixels)),
                                   ours.encode_image(pixels).tokens[:, 0], atol=1e-5, rtol=1e-5)
        # the folder's own tokenizer (HF padding) + HF's text model == the project's tokenizer + backbone
        hf_inputs = CLIPTokenizerFast.from_pretrained(proxy)(captions, padding=True, return_tensors="pt")
        torch.testing.assert_close(projected(hf.get_text_features(**hf_inputs)),
                                   ours.encode_text(ids, mask).global_embedding, atol=1e-5, rtol=1e-5)


def test_fine_tuning_loader_resizes_the_proxys_position_embeddings(proxy):
    saved = load_file(str(proxy / "model.safetensors"))["vision_model.embeddings.position_embedding.weight"]
    assert saved.shape == (1 + 4 * 4, 32)
    model = TRPRModel.from_clip(str(proxy), image_size=(64, 32), fused_dim=16)
    table = model.clip.vision_model.embeddings.position_embedding.weight.detach()
    assert table.shape == (1 + 8 * 4, 32)
    torch.testing.assert_close(table, resize_position_embedding(saved, (8, 4)))
    weights = load_file(str(proxy / "model.safetensors"))
    for name in ("text_model.embeddings.token_embedding.weight", "vision_model.encoder.layers.0.mlp.fc1.weight",
                 "vision_model.embeddings.patch_embedding.weight", "visual_projection.weight"):
        assert torch.equal(model.clip.state_dict()[name], weights[name]), name


def test_complete_proxy_is_reused_and_nothing_temporary_is_left(proxy, root, capsys):
    stamp = (proxy / "model.safetensors").stat().st_mtime_ns
    assert pretrain_proxy.build_proxy(TINY, root, benchmark=None, progress=False) == proxy
    assert "reusing" in capsys.readouterr().out
    assert (proxy / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p.name for p in Path(root).iterdir() if p.name.startswith(".")]
    assert pretrain_proxy.main(["--print-path", "--root", str(root), "--width", "32", "--vision-layers", "1",
                                "--text-layers", "1", "--heads", "2", "--mlp-ratio", "2", "--epochs", "2",
                                "--batch-size", "8", "--corpus-train-ids", "10", "--corpus-heldout-ids", "4",
                                "--corpus-images-per-id", "2", "--corpus-captions-per-image", "2",
                                "--corpus-image-size", "32", "--corpus-seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(proxy)


def test_interrupted_pretraining_resumes_to_the_same_weights(root, tmp_path, monkeypatch):
    corpus = load_corpus(ensure_corpus(TINY.corpus, root, progress=False))
    uninterrupted, _, history = pretrain_proxy.train(TINY, corpus, tmp_path / "straight", progress=False)
    save_state = pretrain_proxy.save_state

    def crash_after_first_epoch(path, state):
        save_state(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_proxy, "save_state", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        pretrain_proxy.train(TINY, corpus, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(pretrain_proxy, "save_state", save_state)
    resumed, _, resumed_history = pretrain_proxy.train(TINY, corpus, tmp_path / "resumed", progress=False)
    assert resumed_history["loss"] == history["loss"] and resumed_history["epochs"] == 2
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_batches_flip_pictures_and_pick_each_pictures_own_captions(root):
    corpus = load_corpus(ensure_corpus(TINY.corpus, root, progress=False))
    batches = pretrain_proxy.CorpusBatches(corpus, corpus.indices("train"), 4, seed=0)
    assert len(batches) == 20 // 4
    first = list(batches.epoch(0))
    assert [len(b[0]) for b in first] == [4] * 5 and first[0][0].shape == (4, 3, 32, 32)
    again = list(batches.epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], next(iter(batches.epoch(1)))[0])
    # every caption in a batch is one of the captions of a picture in it
    tokenizer = get_tokenizer()
    pictures = {tuple(np.asarray(corpus.images[i]).reshape(-1)[:32]) for i in corpus.indices("train")}
    assert len(pictures) == 20
    for pixels, ids, mask in first:
        for row in range(len(ids)):
            text = tokenizer.decode(ids[row, 1:int(mask[row].sum()) - 1]).strip()
            assert any(text.replace(" ", "") == c.replace(" ", "") for cs in corpus.captions for c in cs), text


def test_trainer_fine_tunes_from_the_proxy_folder(proxy, root, tmp_path):
    """The noisy recipe (TRL, 50 % noise, ALR pass in epoch 1) through the trainer's command line."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "train_3rtpr.py", "--config", "proxy-noisy", "--model.backbone", str(proxy),
               "--data.dataset", "synth-pedes-tiny", "--data.root", str(root), "--data.image_size", "[32, 16]",
               "--data.noise_rate", "0.5", "--model.fused_dim", "32", "--train.epochs", "2",
               "--train.batch_size", "48", "--output-dir", str(run_dir), "--final-test"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "test_metrics.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "noise_detection" in records[1]["alr"]
    # the patch convolution is frozen in fine-tuning: both trained models still hold the proxy's
    proxy_conv = load_file(str(proxy / "model.safetensors"))["vision_model.embeddings.patch_embedding.weight"]
    for member in ("model_a", "model_b"):
        trained = load_file(str(run_dir / "last" / member / "model.safetensors"))
        assert torch.equal(trained["clip.vision_model.embeddings.patch_embedding.weight"], proxy_conv)
        assert trained["clip.vision_model.embeddings.position_embedding.weight"].shape == (1 + 4 * 2, 32)


@pytest.mark.parametrize("recipe", ["proxy-clean.yaml", "proxy-noisy.yaml"])
def test_the_recipes_are_the_papers_and_refuse_to_run_without_the_proxy(recipe):
    config = configs.load_config(ROOT / "trpr" / "configs" / recipe)
    assert config["optim"]["eps"] == 1e-3 and config["data"]["dataset"] == "synth-pedes"
    assert (config["loss"]["lambda_sdm"], config["loss"]["lambda_trl"]) == ((1.0, 0.0) if "clean" in recipe else (0.0, 1.0))
    with pytest.raises(FileNotFoundError, match="no such CLIP model directory"):
        TRPRModel.from_clip(config["model"]["backbone"], image_size=tuple(config["data"]["image_size"]))


# ------------------------------------------------------------------ the shipped copy (trpr/pretrained/proxy_clip)
def test_shipped_copy_is_the_fp16_cast_of_the_build_and_loads_like_a_clip_folder(proxy, tmp_path):
    from trpr.experiments import proxy_ship

    target = proxy_ship.write_shipped(proxy, tmp_path / "proxy_clip")
    assert sorted(p.name for p in target.iterdir()) == sorted(proxy_ship.SHIPPED_FILES)
    source, shipped = load_file(proxy / "model.safetensors"), load_file(target / "model.safetensors")
    assert set(source) == set(shipped) and all(t.dtype == torch.float16 for t in shipped.values())
    for name, tensor in source.items():
        assert torch.equal(shipped[name], tensor.half()), name
    result = proxy_ship.compare(proxy, target)
    assert result["bit_identical"] == result["tensors"] == len(source) and result["max_abs_diff"] == 0.0
    card = (target / "README.md").read_text()
    assert proxy_ship.sha256_of(proxy / "model.safetensors") in card
    assert proxy_ship.sha256_of(target / "model.safetensors") in card
    assert str(proxy.parent) not in (target / "pretrain_info.json").read_text()  # no machine paths shipped
    # fine-tuning loads it as fp32 master weights, equal to the fp16 values
    clip = load_clip_model(target)
    assert all(p.dtype == torch.float32 for p in clip.parameters())
    loaded = dict(clip.named_parameters())
    name = next(n for n in loaded if n in shipped)
    assert torch.equal(loaded[name].detach(), shipped[name].float())
    # a changed weight is found by the comparison
    changed = dict(shipped)
    changed[name] = changed[name] + 1
    from safetensors.torch import save_file
    save_file(changed, target / "model.safetensors")
    assert proxy_ship.compare(proxy, target)["bit_identical"] == len(source) - 1


def test_the_repository_ships_the_default_proxy_with_its_card():
    """trpr/pretrained/proxy_clip: the default settings' architecture, the file its card names, loadable at the
    demo's fine-tuning size."""
    from trpr.experiments import proxy_ship
    from trpr.pretrained import PROXY_CLIP

    info = json.loads((PROXY_CLIP / "pretrain_info.json").read_text())
    defaults = pretrain_proxy.ProxySettings()
    assert info["settings"]["width"] == defaults.width and info["proxy_version"] == pretrain_proxy.PROXY_VERSION
    assert proxy_ship.sha256_of(PROXY_CLIP / "model.safetensors") in (PROXY_CLIP / "README.md").read_text()
    model = TRPRModel.from_clip(str(PROXY_CLIP), select_ratio=0.2, image_size=(64, 32))
    assert model.embed_dim == defaults.width
