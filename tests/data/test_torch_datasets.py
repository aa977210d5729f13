"""TrainViews / EvalImages / EvalTexts on synth-pedes-tiny: item shapes, collation, reproducibility."""
import pytest
import torch
from torch.utils.data import DataLoader

from trpr.data import EvalImages, EvalTexts, TrainViews, load_benchmark
from trpr.data.transforms import build_image_transform
from trpr.data.tokenizer import EOT_TOKEN_ID, get_tokenizer, tokenize

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


# ----------------------------------------------------------------------------- uint8 views, epoch keys
def _reference_views(split, tokenizer, position, seed, epoch, num_views=2, image_size=IMAGE_SIZE):
    """Today's float path written out step by step (resize per view, flip, pad-crop, normalise, erase,
    then the text augmentation, all from one generator): TrainViews must equal it bit for bit."""
    import numpy as np
    from PIL import Image

    from trpr.data.images import open_image
    from trpr.data.torch_datasets import image_sources
    from trpr.data.transforms import CLIP_MEAN, CLIP_STD, _uniform, augment_text, random_erase, random_pad_crop

    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    scale, bias = 1.0 / (255.0 * std), -torch.tensor(CLIP_MEAN).view(3, 1, 1) / std
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 2
    generator = torch.Generator().manual_seed(int(state))
    image = open_image(image_sources(split)[position])
    ids, mask = tokenize(tokenizer, [split[position]["caption"]])
    pixels, texts = [], []
    for _ in range(num_views):
        array = np.array(image.resize(image_size[::-1], Image.BICUBIC), dtype=np.uint8)
        if _uniform(generator) < 0.5:
            array = array[:, ::-1]
        array = random_pad_crop(array, 10, generator)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().mul_(scale).add_(bias)
        pixels.append(random_erase(tensor, generator, p=0.5))
        texts.append(augment_text(ids[0], mask[0], generator, prob=0.2))
    return torch.stack(pixels), torch.stack([t[0] for t in texts])


def test_float_views_equal_the_step_by_step_reference(splits, tokenizer):
    views = TrainViews(splits["train"], tokenizer, IMAGE_SIZE, seed=11)
    for position in (0, 7, 30):
        expected_pixels, expected_ids = _reference_views(splits["train"], tokenizer, position, seed=11, epoch=4)
        item = views[(4, position)]
        assert torch.equal(item["pixel_values"], expected_pixels)
        assert torch.equal(item["input_ids"], expected_ids)


@pytest.mark.parametrize("image_size", [IMAGE_SIZE, (96, 40)])
def test_uint8_views_normalised_on_device_equal_the_float_path(splits, tokenizer, image_size):
    from trpr.data.transforms import normalize_uint8

    float_views = TrainViews(splits["train"], tokenizer, image_size, seed=2)
    uint8_views = TrainViews(splits["train"], tokenizer, image_size, seed=2, output="uint8")
    keys = [(e, p) for e in (0, 3) for p in range(0, len(float_views), 5)]
    floats = [float_views[k] for k in keys]
    uint8s = [uint8_views[k] for k in keys]
    pixels = torch.stack([item["pixel_values"] for item in uint8s])
    boxes = torch.stack([item["erase_boxes"] for item in uint8s])
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(keys), 2, 3, *image_size)
    assert boxes.dtype == torch.long and boxes.shape == (len(keys), 2, 4)
    erased = (boxes[..., 2] > 0).float().mean()
    assert 0.25 < erased < 0.75  # random erasing still happens about half the time
    normalised = normalize_uint8(pixels, boxes)
    expected = torch.stack([item["pixel_values"] for item in floats])
    assert normalised.dtype == torch.float32 and torch.equal(normalised, expected)  # bit for bit on the CPU
    for item_f, item_u in zip(floats, uint8s):
        assert torch.equal(item_f["input_ids"], item_u["input_ids"])
    # an erased rectangle is exactly 0 (the mean) in every channel, as in the float path
    view = (boxes[..., 2] > 0).nonzero()[0]
    top, left, height, width = boxes[view[0], view[1]].tolist()
    assert (normalised[view[0], view[1], :, top:top + height, left:left + width] == 0).all()
    # bf16 output and no boxes
    half = normalize_uint8(pixels[:, 0], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (len(keys), 3, *image_size)
    with pytest.raises(ValueError, match="uint8"):
        normalize_uint8(expected)


def test_uint8_eval_images_and_unaugmented_views(splits, tokenizer):
    from trpr.data.transforms import normalize_uint8

    gallery_float = EvalImages(splits["test_gallery"], IMAGE_SIZE)
    gallery_uint8 = EvalImages(splits["test_gallery"], IMAGE_SIZE, output="uint8")
    assert gallery_uint8[3]["pixel_values"].dtype == torch.uint8
    assert torch.equal(normalize_uint8(gallery_uint8[3]["pixel_values"]), gallery_float[3]["pixel_values"])
    plain = TrainViews(splits["train"], tokenizer, IMAGE_SIZE, num_views=1, augment=False, output="uint8")
    item = plain[4]
    assert item["pixel_values"].shape == (1, 3, *IMAGE_SIZE) and not item["erase_boxes"].any()
    reference = TrainViews(splits["train"], tokenizer, IMAGE_SIZE, num_views=1, augment=False)[4]
    assert torch.equal(normalize_uint8(item["pixel_values"], item["erase_boxes"]), reference["pixel_values"])
    with pytest.raises(ValueError, match="output must be one of"):
        TrainViews(splits["train"], tokenizer, IMAGE_SIZE, output="half")


def test_epoch_keys_reach_persistent_workers(splits, tokenizer):
    from torch.utils.data import BatchSampler, SequentialSampler

    from trpr.data import EpochKeyedBatches

    views = TrainViews(splits["train"], tokenizer, IMAGE_SIZE, seed=5, output="uint8")
    batches = EpochKeyedBatches(BatchSampler(SequentialSampler(range(8)), batch_size=4, drop_last=True))
    loader = DataLoader(views, batch_sampler=batches, num_workers=2, persistent_workers=True)
    seen = {}
    for epoch in (0, 1, 0):
        batches.set_epoch(epoch)
        first = next(iter(loader))
        expected = torch.stack([views[(epoch, p)]["pixel_values"] for p in range(4)])
        assert torch.equal(first["pixel_values"], expected)  # the workers used this epoch
        seen.setdefault(epoch, first["pixel_values"])
        assert torch.equal(seen[epoch], first["pixel_values"])  # same epoch, same views
    assert not torch.equal(seen[0], seen[1])
    # the plain-position path with set_epoch gives the same items as the keys
    views.set_epoch(1)
    assert torch.equal(views[2]["pixel_values"], views[(1, 2)]["pixel_values"])
    assert len(batches) == 2 and list(batches)[1] == [(0, 4), (0, 5), (0, 6), (0, 7)]


def test_epoch_keyed_batches_forward_set_epoch():
    from trpr.data import EpochKeyedBatches

    class Inner:
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter([[3, 1]])

        def __len__(self):
            return 1

    inner = Inner()
    keyed = EpochKeyedBatches(inner)
    keyed.set_epoch(7)
    assert inner.epoch == 7 and list(keyed) == [[(7, 3), (7, 1)]]


def test_bench_pipeline_prints_its_table(tmp_path):
    from trpr.data.bench_pipeline import format_table, run

    rows = run("synth-pedes-tiny", num_samples=8, image_size=IMAGE_SIZE, root=tmp_path / "synth")
    assert [row[0] for row in rows] == ["decode", "resize", "item float (2 views)", "item uint8 (2 views)",
                                        "loader float, 1 worker", "loader uint8, 1 worker",
                                        "normalize uint8 batch (CPU)"]
    assert all(wall > 0 and rate > 0 and (cpu is None or cpu >= 0) for _, cpu, wall, rate in rows)
    table = format_table(rows, "title")
    assert table.splitlines()[0] == "title" and "| loader uint8, 1 worker" in table and len(table.splitlines()) == 10
