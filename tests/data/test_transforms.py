"""CLIP tokenizer parity (offline, bundled BPE), tokenize layout, augment_text, image transforms."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from trpr.data.transforms import CLIP_MEAN, CLIP_STD, augment_text, build_image_transform
from trpr.data.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, get_tokenizer, tokenize

# Published ids of the openai CLIP tokenizer (clip.tokenize / openai/clip-vit-base-patch16), collected
# from the CLIP README, HF docs and public tokenizer test-suites.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "a painting of a cat": [49406, 320, 3086, 539, 320, 2368, 49407],
    "An astronaut riding a horse": [49406, 550, 18376, 6765, 320, 4558, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "bozuman": [49406, 647, 4091, 786, 49407],
    "a photo of a wrench on a mountainside": [49406, 320, 1125, 539, 320, 30980, 525, 320, 14547, 1145, 49407],
    "": [49406, 49407],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return get_tokenizer()


@pytest.mark.parametrize("text", sorted(KNOWN_IDS))
def test_tokenizer_matches_published_clip_ids(tokenizer, text):
    ids, mask = tokenize(tokenizer, [text])
    length = int(mask[0].sum())
    assert ids[0, :length].tolist() == KNOWN_IDS[text]
    assert tokenizer(text)["input_ids"] == KNOWN_IDS[text]


def test_lowercase_and_whitespace_cleanup(tokenizer):
    reference = tokenize(tokenizer, ["a photo of a cat"])[0]
    for variant in ["A pHotO of a CaT", "    a    photo  of\n a\tcat    "]:
        assert torch.equal(tokenize(tokenizer, [variant])[0], reference)


def test_tokenizer_is_cached_and_vocab_complete(tokenizer):
    assert get_tokenizer() is tokenizer
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids("<|startoftext|>") == SOT_TOKEN_ID
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == EOT_TOKEN_ID


def test_tokenizer_from_local_folder(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    local = get_tokenizer(str(tmp_path / "tok"))
    assert local("a photo of a dog")["input_ids"] == KNOWN_IDS["a photo of a dog"]


def test_tokenize_layout_and_truncation(tokenizer):
    ids, mask = tokenize(tokenizer, ["a photo of a cat", "cat " * 100])
    assert ids.shape == mask.shape == (2, 77) and ids.dtype == mask.dtype == torch.long
    assert mask[0].sum() == 7 and (ids[0, 7:] == 0).all() and (mask[0, 7:] == 0).all()
    assert mask[1].all()  # 75 words + SOT + EOT fill the context
    assert ids[1, 0] == SOT_TOKEN_ID and ids[1, 76] == EOT_TOKEN_ID and (ids[1, 1:76] == 2368).all()
    # the EOT position contract: attention_mask.sum() - 1
    eot = mask.sum(1) - 1
    assert (ids[torch.arange(2), eot] == EOT_TOKEN_ID).all()


def test_augment_text_prob_zero_is_identity(tokenizer):
    ids, mask = tokenize(tokenizer, ["a woman in a red coat and black trousers"])
    out_ids, out_mask = augment_text(ids[0], mask[0], torch.Generator().manual_seed(0), prob=0.0)
    assert torch.equal(out_ids, ids[0]) and torch.equal(out_mask, mask[0])


def test_augment_text_statistics_and_structure(tokenizer):
    ids, mask = tokenize(tokenizer, ["word " * 40])  # 40 identical word tokens
    word = int(ids[0, 1])
    generator = torch.Generator().manual_seed(1)
    masked = replaced = deleted = total = 0
    for _ in range(400):
        out_ids, out_mask = augment_text(ids[0], mask[0], generator, prob=0.2)
        length = int(out_mask.sum())
        assert out_mask[:length].all() and not out_mask[length:].any()  # contiguous mask
        assert out_ids[0] == SOT_TOKEN_ID and out_ids[length - 1] == EOT_TOKEN_ID
        assert (out_ids[length:] == 0).all()
        words = out_ids[1 : length - 1]
        assert ((words >= 1) & (words <= MASK_TOKEN_ID)).all()
        masked += int((words == MASK_TOKEN_ID).sum())
        replaced += int(((words != MASK_TOKEN_ID) & (words != word)).sum())
        deleted += 40 - words.numel()
        total += 40
    # picked 20 % of tokens: half masked, a fifth random, the rest (30 %) deleted
    assert masked / total == pytest.approx(0.10, abs=0.012)
    assert replaced / total == pytest.approx(0.04, abs=0.008)
    assert deleted / total == pytest.approx(0.06, abs=0.01)


def test_augment_text_keeps_specials_and_input(tokenizer):
    ids, mask = tokenize(tokenizer, ["a man"])
    before = ids.clone()
    out_ids, out_mask = augment_text(ids[0], mask[0], torch.Generator().manual_seed(3), prob=1.0)
    assert torch.equal(ids, before)  # input untouched
    length = int(out_mask.sum())
    assert out_ids[0] == SOT_TOKEN_ID and out_ids[length - 1] == EOT_TOKEN_ID and 2 <= length <= 4
    empty_ids, empty_mask = tokenize(tokenizer, [""])
    out_ids, out_mask = augment_text(empty_ids[0], empty_mask[0], torch.Generator(), prob=1.0)
    assert torch.equal(out_ids, empty_ids[0])


def _gradient_image(height=64, width=24):
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 128)], -1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def test_test_transform_shape_and_normalisation():
    image = _gradient_image()
    out = build_image_transform(train=False, image_size=(64, 24))(image)
    assert out.shape == (3, 64, 24) and out.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(out, expected, atol=1e-5)  # same size: no resize, exact normalisation
    resized = build_image_transform(train=False, image_size=(384, 128))(image)
    assert resized.shape == (3, 384, 128)
    low, high = (0 - mean) / std, (1 - mean) / std
    assert (resized >= low - 1e-4).all() and (resized <= high + 1e-4).all()


def test_train_transform_is_reproducible_and_augments():
    image = _gradient_image()
    transform = build_image_transform(train=True, image_size=(64, 24))
    first = transform(image, torch.Generator().manual_seed(5))
    again = transform(image, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert torch.equal(transform(image, random.Random(2)), transform(image, random.Random(2)))
    plain = build_image_transform(train=False, image_size=(64, 24))(image)
    outputs = [transform(image, torch.Generator().manual_seed(s)) for s in range(40)]
    assert all(o.shape == (3, 64, 24) for o in outputs)
    assert sum(not torch.equal(o, plain) for o in outputs) >= 35
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    black = (0 - mean) / std  # padding colour
    low, high = black, (1 - mean) / std
    for out in outputs:
        erased = (out == 0).all(0)
        inside = ((out >= low - 1e-4) & (out <= high + 1e-4)).all(0)
        assert (inside | erased).all()
    # roughly half the images have an erased rectangle (value 0 = the mean in all channels)
    erased_count = sum(bool((o == 0).all(0).sum() >= 0.02 * 64 * 24 * 0.5) for o in outputs)
    assert 8 <= erased_count <= 32
    # horizontal flips happen: the red channel (x gradient) reverses direction in some outputs
    flipped = sum(float(o[0, 32, 20] - o[0, 32, 3]) < 0 for o in outputs)
    assert 5 <= flipped <= 35


def test_tokenizer_builds_without_a_writable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TRPR_CACHE", str(blocker))
    fresh = get_tokenizer.__wrapped__(None)  # bypass the lru_cache
    assert fresh("a photo of a cat")["input_ids"] == KNOWN_IDS["a photo of a cat"]
