"""TrainViews / EvalImages / EvalTexts on synth-pedes-tiny: item shapes, collation, reproducibility."""
import pytest
import torch
from torch.utils.data import DataLoader

from data import EvalImages, EvalTexts, TrainViews, load_benchmark
from data.transforms import EOT_TOKEN_ID, build_image_transform, get_tokenizer, tokenize

IMAGE_SIZE = (64, 32)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return load_benchmark("synth-pedes-tiny", root=tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def test_train_views_item(splits, tokenizer):
    views = TrainViews(splits["train"], tokenizer, IMAGE_SIZE, num_views=2, seed=0)
    assert len(views) == len(splits["train"])
    item = views[5]
    assert item["index"] == 5 and item["pid"] == splits["train"][5]["pid"]
    assert item["pixel_values"].shape == (2, 3, *IMAGE_SIZE) and item["pixel_values"].dtype == torch.float32
    assert item["input_ids"].shape == item["attention_mask"].shape == (2, 77)
    for v in range(2):
        eot = int(item["attention_mask"][v].sum()) - 1
        assert item["input_ids"][v, 0] == 49406 and item["input_ids"][v, eot] == EOT_TOKEN_ID
    # the two views are independent draws
    assert not torch.equal(item["pixel_values"][0], item["pixel_values"][1])


def test_train_views_reproducible_per_epoch(splits, tokenizer):
    views = TrainViews(splits["train"], tokenizer, IMAGE_SIZE, seed=7)
    views.set_epoch(1)
    first = views[3]
    again = views[3]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert torch.equal(first["input_ids"], again["input_ids"])
    views.set_epoch(2)
    other = views[3]
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    # worker count does not matter after set_epoch
    views.set_epoch(1)
    batch0 = next(iter(DataLoader(views, batch_size=4, num_workers=0)))
    batch2 = next(iter(DataLoader(views, batch_size=4, num_workers=2)))
    assert torch.equal(batch0["pixel_values"], batch2["pixel_values"])
    assert batch0["pixel_values"].shape == (4, 2, 3, *IMAGE_SIZE) and batch0["index"].tolist() == [0, 1, 2, 3]


def test_train_views_without_augmentation(splits, tokenizer):
    views = TrainViews(splits["train"], tokenizer, IMAGE_SIZE, num_views=1, augment=False)
    item = views[2]
    row = splits["train"][2]
    expected = build_image_transform(train=False, image_size=IMAGE_SIZE)(row["image"])
    assert item["pixel_values"].shape == (1, 3, *IMAGE_SIZE)
    assert torch.allclose(item["pixel_values"][0], expected)
    ids, mask = tokenize(tokenizer, [row["caption"]])
    assert torch.equal(item["input_ids"], ids) and torch.equal(item["attention_mask"], mask)


def test_eval_images_and_texts(splits, tokenizer):
    gallery = EvalImages(splits["test_gallery"], IMAGE_SIZE)
    queries = EvalTexts(splits["test_queries"], tokenizer)
    assert len(gallery) == len(splits["test_gallery"]) and len(queries) == len(splits["test_queries"])
    image_item = gallery[1]
    assert set(image_item) == {"pid", "image_id", "pixel_values"}
    assert image_item["pixel_values"].shape == (3, *IMAGE_SIZE) and image_item["image_id"] == 1
    text_item = queries[3]
    assert set(text_item) == {"pid", "image_id", "input_ids", "attention_mask"}
    assert text_item["input_ids"].shape == (77,)
    assert gallery[text_item["image_id"]]["pid"] == text_item["pid"]
    batch = next(iter(DataLoader(queries, batch_size=5)))
    assert batch["input_ids"].shape == (5, 77) and batch["pid"].shape == (5,)
    image_batch = next(iter(DataLoader(gallery, batch_size=3)))
    assert image_batch["pixel_values"].shape == (3, 3, *IMAGE_SIZE)
