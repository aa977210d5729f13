"""evaluate_pair under an Accelerator of 2 CPU processes (gloo): the extraction is sharded (uneven
shards included) and gathered, and every rank gets the single-process result."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from trpr import data
from trpr import evaluation
from trpr import modeling
from trpr.data.tokenizer import get_tokenizer
from trpr.runtime.sharding import shard_indices

IMAGE_SIZE = (64, 32)
WORLD_SIZE = 2
GALLERY_ROWS, QUERY_ROWS = 23, 47  # not multiples of WORLD_SIZE: the last shard is padded


def _splits(root):
    splits = data.load_benchmark("synth-pedes-tiny", root=root)
    return splits["test_gallery"].select(range(GALLERY_ROWS)), splits["test_queries"].select(range(QUERY_ROWS))


def _worker(rank: int, pair_dir: str, root: str, out_dir: str, port: int) -> None:
    """One process of the group (spawned: re-imports everything, with the parent's sys.path)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    gallery, queries = _splits(root)
    pair = modeling.ReciprocalPair.from_pretrained(pair_dir)
    rows = evaluation.evaluate_pair(pair, gallery, queries, tokenizer=get_tokenizer(), image_size=IMAGE_SIZE,
                                    batch_size=4, accelerator=accelerator, i2t=True)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"num_processes": accelerator.num_processes, "rows": rows}))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sharded_extraction_equals_single_process(tmp_path):
    root = tmp_path / "datasets"
    gallery, queries = _splits(root)
    torch.manual_seed(0)
    pair = modeling.ReciprocalPair.from_clip(modeling.small_clip_config(), select_ratio=0.2, fused_dim=96,
                                             image_size=IMAGE_SIZE)
    pair.save_pretrained(tmp_path / "pair")
    expected = evaluation.evaluate_pair(pair, gallery, queries, tokenizer=get_tokenizer(), image_size=IMAGE_SIZE,
                                        batch_size=8, i2t=True)
    torch.multiprocessing.start_processes(
        _worker, args=(str(tmp_path / "pair"), str(root), str(tmp_path), _free_port()),
        nprocs=WORLD_SIZE, start_method="spawn")
    for rank in range(WORLD_SIZE):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["num_processes"] == WORLD_SIZE
        assert list(result["rows"]) == list(expected)
        for key, metrics in expected.items():
            assert result["rows"][key] == pytest.approx(metrics, abs=1e-6), (rank, key)


def test_shard_indices_cover_every_item_once():
    class FakeAccelerator:
        num_processes = 3

        def __init__(self, rank):
            self.process_index = rank

    shards = [shard_indices(7, FakeAccelerator(rank)) for rank in range(3)]
    assert [per for _, per in shards] == [3, 3, 3]
    gathered = [i for indices, _ in shards for i in indices]
    assert gathered[:7] == list(range(7)) and gathered[7:] == [6, 6]
