"""Fused heads: token selection (image top-k, text real words only), masked BatchNorm,
image_tokens all vs topk, select_ratio = 0, padding invariance."""
import pytest
import torch
from torch import nn

from trpr.modeling import TRPRModel, small_clip_config
from trpr.modeling.fused import FusedHead, MaskedBatchNorm1d, num_selected, select_image_tokens, select_text_tokens
from tests.caption_ids import EOT, SOT, captions


def test_number_of_selected_tokens():
    assert num_selected(192, 0.2) == 38
    assert num_selected(75, 0.2) == 15
    assert num_selected(75, 0.0) == 0
    assert num_selected(8, 0.1) == 1  # never zero when the head is on


def test_text_selection_keeps_only_real_words_and_honours_caption_length():
    batch, length, width, k = 3, 20, 4, 5
    eot = torch.tensor([3, 10, 19])  # 2, 9 and 18 real words
    tokens = torch.arange(batch * length * width, dtype=torch.float32).view(batch, length, width)
    scores = torch.rand(batch, length)
    scores[:, 0] = 10.0  # SOT most attended: must not be chosen
    scores[torch.arange(batch), eot] = 9.0  # EOT too
    scores[0, 4:] = 8.0  # padding of row 0
    selected, valid, index = select_text_tokens(tokens, scores, eot, k)
    assert selected.shape == (batch, k, width) and valid.shape == (batch, k)
    assert valid.sum(1).tolist() == [2, 5, 5]
    for row in range(batch):
        chosen = index[row][valid[row]]
        assert torch.all((chosen >= 1) & (chosen < eot[row])), (row, chosen)
        words = scores[row, 1:eot[row]]
        expected = (torch.topk(words, min(k, len(words))).indices + 1).sort().values
        assert torch.equal(chosen.sort().values, expected)
        assert torch.equal(selected[row], tokens[row, index[row]])


def test_image_selection_takes_the_most_attended_patches():
    tokens = torch.randn(2, 12, 3)
    scores = torch.rand(2, 12)
    selected = select_image_tokens(tokens, scores, 4)
    for row in range(2):
        top = scores[row].topk(4).indices
        assert torch.equal(selected[row], tokens[row, top])


def test_masked_batchnorm_equals_batchnorm_over_valid_tokens():
    torch.manual_seed(0)
    masked, plain = MaskedBatchNorm1d(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        masked.weight.uniform_(0.5, 1.5), masked.bias.uniform_(-1, 1)
    plain.load_state_dict(masked.state_dict())
    tokens = torch.randn(4, 5, 6) * 3 + 1
    valid = torch.rand(4, 5) > 0.4
    valid[0, 0] = True
    out = masked(tokens, valid)
    expected = plain(tokens[valid])
    torch.testing.assert_close(out[valid], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var)
    assert masked.num_batches_tracked.item() == plain.num_batches_tracked.item() == 1
    masked.eval(), plain.eval()
    torch.testing.assert_close(masked(tokens, valid)[valid], plain(tokens[valid]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked(tokens), plain(tokens.view(20, 6)).view(4, 5, 6), atol=1e-5, rtol=1e-5)


def test_fused_head_pools_valid_tokens_and_adds_projected_global():
    torch.manual_seed(0)
    head = FusedHead(8, 16).eval()
    tokens, global_embedding = torch.randn(2, 3, 8), torch.randn(2, 8)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    fused = head.fuse(tokens, global_embedding, valid)
    per_token = head.token_fc2(torch.relu(head.token_norm(head.token_fc1(tokens / tokens.norm(dim=-1, keepdim=True)))))
    projected = head.global_proj(global_embedding)
    torch.testing.assert_close(fused[0], per_token[0, :2].amax(0) + projected[0])
    torch.testing.assert_close(fused[1], projected[1])  # no word selected: m = 0


@pytest.fixture(scope="module")
def topk_and_all():
    torch.manual_seed(0)
    config = small_clip_config()
    topk = TRPRModel.from_clip(config, image_size=(128, 64), fused_dim=32, select_ratio=0.25, head_seed=0,
                               image_tokens="topk").eval()
    every = TRPRModel.from_clip(config, image_size=(128, 64), fused_dim=32, select_ratio=0.25,
                                image_tokens="all").eval()
    every.load_state_dict(topk.state_dict())
    return topk, every


def test_image_tokens_topk_pools_selected_patches_and_all_pools_every_patch(topk_and_all):
    topk, every = topk_and_all
    pixels = torch.randn(3, 3, 128, 64)
    with torch.no_grad():
        out = topk.clip.encode_image(pixels)
        global_embedding, patches, scores = out.tokens[:, 0], out.tokens[:, 1:], out.attention_row[:, 1:]
        assert topk.image_head.k == 8  # floor(32 patches × 0.25)
        chosen = patches.gather(1, scores.topk(8, dim=1).indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        expected_topk = topk.image_head.fuse(chosen, global_embedding)
        expected_all = topk.image_head.fuse(patches, global_embedding)
        got_topk, got_all = topk.encode_image(pixels)[1], every.encode_image(pixels)[1]
    torch.testing.assert_close(got_topk, expected_topk)
    torch.testing.assert_close(got_all, expected_all)
    assert not torch.allclose(got_topk, got_all)


def test_topk_with_ratio_one_equals_all():
    torch.manual_seed(0)
    config = small_clip_config()
    topk = TRPRModel.from_clip(config, image_size=(64, 32), fused_dim=32, select_ratio=1.0, head_seed=0)
    every = TRPRModel.from_clip(config, image_size=(64, 32), fused_dim=32, select_ratio=1.0, image_tokens="all")
    every.load_state_dict(topk.state_dict())
    pixels = torch.randn(4, 3, 64, 32)
    torch.testing.assert_close(topk.encode_image(pixels)[1], every.encode_image(pixels)[1])  # training-mode BN


def test_select_ratio_zero_returns_the_global_path():
    model = TRPRModel.from_clip(small_clip_config(), image_size=(64, 32), select_ratio=0.0)
    assert model.image_head is None and model.text_head is None and model.output_dim == 64
    assert all(name.startswith("clip.") for name, _ in model.named_parameters())
    image = model.encode_image(torch.randn(2, 3, 64, 32))
    text = model.encode_text(*captions([6, 9]))
    assert torch.equal(image[0], image[1]) and torch.equal(text[0], text[1])
    assert image[1].shape == (2, 64)


def test_text_fused_ignores_padding_content_and_context_length():
    torch.manual_seed(0)
    model = TRPRModel.from_clip(small_clip_config(), image_size=(64, 32), fused_dim=32, head_seed=0).eval()
    ids, mask = captions([4, 12, 30])
    noisy_ids = ids.clone()
    noisy_ids[mask == 0] = torch.randint(1, 49000, (int((mask == 0).sum()),))
    with torch.no_grad():
        reference = model.encode_text(ids, mask)
        noisy = model.encode_text(noisy_ids, mask)
        trimmed = model.encode_text(ids[:, :30], mask[:, :30])
    for a, b, c in zip(reference, noisy, trimmed):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_short_caption_selects_exactly_its_words():
    """k = 15 but the caption has 3 words: the three word positions are selected, nothing else."""
    torch.manual_seed(0)
    model = TRPRModel.from_clip(small_clip_config(), image_size=(64, 32), fused_dim=32, head_seed=0).eval()
    assert model.text_head.k == 15
    ids, mask = captions([5])
    with torch.no_grad():
        tokens = model.clip.encode_text(ids, mask)
        selected, valid, index = select_text_tokens(tokens.tokens, tokens.attention_row, tokens.global_index, 15)
    assert valid.sum().item() == 3 and sorted(index[0, :3].tolist()) == [1, 2, 3]


def test_image_tokens_reference_pools_every_token_with_cls_on_a_two_token_toy():
    """CLS [3, 4] + one patch [0, -2]; fc1 = identity, fc2 = [I; -I], no global projection, eval-mode BN
    (running mean 0, var 1): the token MLP gives CLS -> [0.6, 0.8, -0.6, -0.8] / sqrt(1 + eps) and the
    patch -> 0 (ReLU), so `reference` max-pools to [0.6, 0.8, 0, 0] / sqrt(1 + eps) and `all` / `topk`
    (the patch alone) to 0."""
    from trpr.modeling.fused import ImageFusedHead

    tokens = torch.tensor([[[3.0, 4.0], [0.0, -2.0]]])
    attention = torch.tensor([[0.0, 1.0]])
    pooled = {}
    for mode in ("topk", "all", "reference"):
        head = ImageFusedHead(2, 4, num_patches=1, select_ratio=1.0, image_tokens=mode).eval()
        with torch.no_grad():
            head.token_fc1.weight.copy_(torch.eye(2)), head.token_fc1.bias.zero_()
            head.token_fc2.weight.copy_(torch.cat([torch.eye(2), -torch.eye(2)])), head.token_fc2.bias.zero_()
            head.global_proj.weight.zero_(), head.global_proj.bias.zero_()
            pooled[mode] = head(tokens, attention)
    scale = (1 + 1e-5) ** -0.5
    torch.testing.assert_close(pooled["reference"], torch.tensor([[0.6, 0.8, 0.0, 0.0]]) * scale)
    torch.testing.assert_close(pooled["all"], torch.zeros(1, 4))
    torch.testing.assert_close(pooled["topk"], torch.zeros(1, 4))


def test_image_tokens_reference_model_round_trip_and_config(tmp_path):
    from trpr.configs import ConfigError, load_config

    torch.manual_seed(0)
    model = TRPRModel.from_clip(small_clip_config(), image_size=(64, 32), fused_dim=32, image_tokens="reference")
    assert model.image_head.image_tokens == "reference" and model.explain_image(torch.randn(1, 3, 64, 32)) is None
    model.save_pretrained(tmp_path)
    assert TRPRModel.from_pretrained(tmp_path).image_tokens == "reference"
    assert load_config(None, ["--model.image_tokens", "reference"])["model"]["image_tokens"] == "reference"
    with pytest.raises(ConfigError, match="model.image_tokens must be topk, all or reference, got 'cls'"):
        load_config(None, ["--model.image_tokens", "cls"])
