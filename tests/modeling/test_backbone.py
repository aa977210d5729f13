"""Backbone: SDPA forward + separate attention row vs HF eager attention, position-embedding resize,
loading a transformers CLIP folder, frozen conv, gradient checkpointing, input checks."""
import math

import pytest
import torch
from transformers import CLIPModel

from trpr.modeling import TRPRModel, small_clip_config
from trpr.modeling.backbone import resize_position_embedding
from tests.caption_ids import EOT, SOT, captions


@pytest.fixture(scope="module")
def square_clip_dir(tmp_path_factory):
    """A tiny CLIP saved by transformers, with a 64 px native input (4×4 grid)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip64")
    CLIPModel(small_clip_config(vision_image_size=64)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def eager_and_ours(square_clip_dir):
    reference = CLIPModel.from_pretrained(square_clip_dir, attn_implementation="eager").eval()
    ours = TRPRModel.from_clip(square_clip_dir, image_size=(64, 64)).eval()
    return reference, ours


def test_image_attention_row_and_tokens_match_eager_attention(eager_and_ours):
    reference, ours = eager_and_ours
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = reference.vision_model(pixel_values=pixels, output_attentions=True)
        got = ours.clip.encode_image(pixels)
        expected_tokens = reference.visual_projection(reference.vision_model.post_layernorm(expected.last_hidden_state))
    expected_row = expected.attentions[-1][:, :, 0, :].mean(dim=1)  # CLS query, averaged over heads
    assert got.attention_row.shape == (3, 17)
    torch.testing.assert_close(got.attention_row, expected_row, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.tokens, expected_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.attention_row.sum(-1), torch.ones(3), atol=1e-5, rtol=0)


def test_text_attention_row_and_tokens_match_eager_attention_with_padding(eager_and_ours):
    reference, ours = eager_and_ours
    lengths = [4, 19, 77]
    ids, mask = captions(lengths)
    with torch.no_grad():
        expected = reference.text_model(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = ours.clip.encode_text(ids, mask)
        expected_global = reference.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert torch.equal(got.global_index, torch.tensor(lengths) - 1)
    for row, length in enumerate(lengths):
        expected_row = expected.attentions[-1][row, :, length - 1, :].mean(dim=0)  # EOT query
        torch.testing.assert_close(got.attention_row[row], expected_row, atol=1e-5, rtol=0)
        assert torch.all(got.attention_row[row, length:] == 0)  # padding gets no attention
        real_tokens = reference.text_projection(expected.last_hidden_state[row, :length])
        torch.testing.assert_close(got.tokens[row, :length], real_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.global_embedding, expected_global, atol=1e-5, rtol=1e-4)


def bilinear_reference(grid, out_h, out_w):
    """Hand-written bilinear resize (half-pixel centres, edge clamp) of grid [H, W] -> [out_h, out_w]."""
    in_h, in_w = grid.shape
    out = torch.empty(out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        y = min(max((i + 0.5) * in_h / out_h - 0.5, 0.0), in_h - 1)
        y0 = math.floor(y)
        y1, wy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = min(max((j + 0.5) * in_w / out_w - 0.5, 0.0), in_w - 1)
            x0 = math.floor(x)
            x1, wx = min(x0 + 1, in_w - 1), x - x0
            top = grid[y0, x0] * (1 - wx) + grid[y0, x1] * wx
            bottom = grid[y1, x0] * (1 - wx) + grid[y1, x1] * wx
            out[i, j] = top * (1 - wy) + bottom * wy
    return out


def smooth_field(side, channels):
    """[1 + side², C] position table: CLS row then a smooth function of (row, col) per channel."""
    rows = torch.arange(side, dtype=torch.float64).view(side, 1, 1)
    cols = torch.arange(side, dtype=torch.float64).view(1, side, 1)
    phase = torch.arange(channels, dtype=torch.float64).view(1, 1, channels)
    field = torch.sin(0.3 * rows + 0.1 * phase) + torch.cos(0.2 * cols - 0.05 * phase) + 0.01 * rows * cols
    cls = torch.full((1, channels), 7.0, dtype=torch.float64)
    return torch.cat([cls, field.reshape(side * side, channels)]).float()


def test_position_embedding_resize_is_bilinear_on_the_grid():
    table = smooth_field(14, 3)
    resized = resize_position_embedding(table, (24, 8))
    assert resized.shape == (1 + 24 * 8, 3)
    assert torch.equal(resized[0], table[0])
    for channel in range(3):
        expected = bilinear_reference(table[1:, channel].double().view(14, 14), 24, 8)
        torch.testing.assert_close(resized[1:, channel].view(24, 8).double(), expected, atol=1e-5, rtol=0)


def test_from_clip_loads_a_transformers_folder_and_resizes_its_position_embeddings(tmp_path):
    torch.manual_seed(1)
    clip = CLIPModel(small_clip_config())  # 224 px native: 14×14 grid
    with torch.no_grad():
        clip.vision_model.embeddings.position_embedding.weight.copy_(smooth_field(14, 64))
    clip.save_pretrained(tmp_path)
    model = TRPRModel.from_clip(tmp_path, image_size=(384, 128))
    table = model.clip.vision_model.embeddings.position_embedding.weight
    assert isinstance(table, torch.nn.Parameter) and table.shape == (193, 64)
    torch.testing.assert_close(table.detach(), resize_position_embedding(smooth_field(14, 64), (24, 8)))
    for name in ("text_model.embeddings.token_embedding.weight", "vision_model.encoder.layers.1.self_attn.q_proj.weight",
                 "visual_projection.weight", "text_projection.weight"):
        assert torch.equal(model.clip.state_dict()[name], clip.state_dict()[name]), name
    assert "clip.logit_scale" not in dict(model.named_parameters())


def test_half_precision_clip_folder_loads_as_fp32(tmp_path):
    CLIPModel(small_clip_config()).half().save_pretrained(tmp_path)
    model = TRPRModel.from_clip(tmp_path, image_size=(64, 32), fused_dim=16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_missing_clip_sources_raise_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no such CLIP model directory"):
        TRPRModel.from_clip(tmp_path / "missing" / "clip")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TRPRModel.from_clip(tmp_path)
    with pytest.raises(OSError, match="could not load CLIP weights 'nobody-3rtpr/no-such-clip'"):
        TRPRModel.from_clip("nobody-3rtpr/no-such-clip")


def test_patch_conv_is_frozen_and_everything_else_trains():
    model = TRPRModel.from_clip(small_clip_config(), image_size=(64, 32), fused_dim=32)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["clip.vision_model.embeddings.patch_embedding.weight"]


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = TRPRModel.from_clip(small_clip_config(), image_size=(64, 32), fused_dim=32).train()
    pixels = torch.randn(4, 3, 64, 32)
    ids, mask = captions([5, 9, 12, 3])

    def run():
        model.zero_grad()
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
        (image[0].sum() + image[1].square().mean() + text[0].sum() + text[1].square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return image + text, grads

    plain_out, plain_grads = run()
    model.set_gradient_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    for a, b in zip(plain_out, ckpt_out):
        torch.testing.assert_close(a, b)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(plain_grads[name], ckpt_grads[name], atol=1e-6, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    model = TRPRModel.from_clip(small_clip_config(), image_size=(64, 32), fused_dim=32)
    with pytest.raises(ValueError, match="64, 32"):
        model.encode_image(torch.randn(1, 3, 32, 64))
    ids, mask = captions([5])
    with pytest.raises(ValueError, match="right-padded"):
        model.encode_text(ids, mask.flip(-1))
    with pytest.raises(ValueError, match="exceeds"):
        model.encode_text(torch.zeros(1, 80, dtype=torch.long), torch.ones(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        TRPRModel.from_clip(small_clip_config(), image_size=(100, 64))
