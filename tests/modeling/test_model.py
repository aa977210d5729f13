"""TRPRModel: shapes and dtypes (fp32 and bf16 autocast), gradients, checkpoint round trip and bad
checkpoints, the full ViT-B/16 config at 384×128, torch.compile without graph breaks."""
import json

import pytest
import torch

from trpr.modeling import TRPRModel, small_clip_config, vit_b16_config
from trpr.modeling.model import count_parameters
from tests.caption_ids import captions


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return TRPRModel.from_clip(small_clip_config(), image_size=(384, 128), fused_dim=48, head_seed=0)


def test_shapes_and_dtypes(tiny):
    pixels, (ids, mask) = torch.randn(2, 3, 384, 128), captions([7, 40])
    image_global, image_fused = tiny.encode_image(pixels)
    text_global, text_fused = tiny.encode_text(ids, mask)
    assert image_global.shape == text_global.shape == (2, 64)
    assert image_fused.shape == text_fused.shape == (2, 48)
    assert tiny.image_head.k == 38 and tiny.text_head.k == 15  # 192 patches, 75 words, ρ = 0.2
    for tensor in (image_global, image_fused, text_global, text_fused):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    outputs = tiny(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    assert set(outputs) == {"image_global", "image_fused", "text_global", "text_fused"}


def test_bf16_autocast_forward_and_backward(tiny):
    pixels, (ids, mask) = torch.randn(2, 3, 384, 128), captions([7, 40])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_global, image_fused = tiny.encode_image(pixels)
        text_global, text_fused = tiny.encode_text(ids, mask)
        rows = tiny.clip.encode_text(ids, mask).attention_row
    for tensor in (image_global, image_fused, text_global, text_fused, rows):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    torch.testing.assert_close(rows.sum(-1), torch.ones(2))
    (image_fused * text_fused).sum().backward()
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    assert torch.isfinite(tiny.clip.text_projection.weight.grad).all()


def test_gradients_reach_backbone_and_both_heads(tiny):
    pixels, (ids, mask) = torch.randn(2, 3, 384, 128), captions([7, 40])
    image_global, image_fused = tiny.encode_image(pixels)
    text_global, text_fused = tiny.encode_text(ids, mask)
    loss = (image_fused @ text_fused.T).sum() + (image_global @ text_global.T).sum()
    loss.backward()
    for name, parameter in tiny.named_parameters():
        if not parameter.requires_grad:
            assert name == "clip.vision_model.embeddings.patch_embedding.weight" and parameter.grad is None
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_save_load_round_trip_is_bit_identical(tiny, tmp_path):
    pixels, (ids, mask) = torch.randn(2, 3, 384, 128), captions([7, 40])
    tiny.encode_text(ids, mask), tiny.encode_image(pixels)  # training step moves the BN running stats
    tiny.eval()
    tiny.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["image_size"] == [384, 128] and config["fused_dim"] == 48 and config["model_type"] == "3rtpr"
    loaded = TRPRModel.from_pretrained(tmp_path).eval()
    assert loaded.clip.vision_model.embeddings.position_embedding.weight.shape == (193, 64)
    for name, tensor in tiny.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        for a, b in zip(tiny.encode_image(pixels) + tiny.encode_text(ids, mask),
                        loaded.encode_image(pixels) + loaded.encode_text(ids, mask)):
            assert torch.equal(a, b)
    assert not loaded.clip.vision_model.embeddings.patch_embedding.weight.requires_grad


def test_bad_checkpoints_raise_errors_naming_the_file(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TRPRModel.from_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["fused_dim"] = "wide"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json.*fused_dim"):
        TRPRModel.from_pretrained(tmp_path)
    config["fused_dim"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors.*does not match"):
        TRPRModel.from_pretrained(tmp_path)


def test_head_seed_controls_head_init_only():
    config = small_clip_config()
    torch.manual_seed(3)
    first = TRPRModel.from_clip(config, image_size=(64, 32), fused_dim=16, head_seed=5)
    torch.manual_seed(4)
    second = TRPRModel.from_clip(config, image_size=(64, 32), fused_dim=16, head_seed=5)
    assert torch.equal(first.image_head.token_fc1.weight, second.image_head.token_fc1.weight)
    assert not torch.equal(first.clip.text_projection.weight, second.clip.text_projection.weight)
    second.reset_heads(6)
    assert not torch.equal(first.image_head.token_fc1.weight, second.image_head.token_fc1.weight)


def test_full_vit_b16_builds_and_runs_at_384x128():
    torch.manual_seed(0)
    model = TRPRModel.from_clip(vit_b16_config()).eval()
    counts = count_parameters(model)
    # openai/clip-vit-base-patch16 has 149,620,737 parameters incl. logit_scale (1) and a 197-row
    # position table; here 193 rows: 149,620,736 - 4 × 768 = 149,617,664.
    assert counts["backbone"] == 149_617_664
    assert counts["heads"] == 2 * (512 * 1024 + 1024 + 2 * 1024 + 1024 * 2048 + 2048 + 512 * 2048 + 2048)
    with torch.no_grad():
        image_global, image_fused = model.encode_image(torch.randn(1, 3, 384, 128))
        text_global, text_fused = model.encode_text(*captions([12]))
    assert image_global.shape == text_global.shape == (1, 512)
    assert image_fused.shape == text_fused.shape == (1, 2048)


def test_forward_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = TRPRModel.from_clip(small_clip_config(num_hidden_layers=1), image_size=(64, 32), fused_dim=16).eval()
    pixels, (ids, mask) = torch.randn(2, 3, 64, 32), captions([5, 9], context=12)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        expected = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_import_needs_no_datasets_evaluate_or_sklearn():
    """trpr/modeling/ must import on a GPU image without datasets / evaluate (and scikit-learn stays lazy)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, trpr.modeling; bad = [m for m in ('datasets', 'evaluate', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
