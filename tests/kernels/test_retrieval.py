"""Retrieval metrics: hand-computed cases, ties, no-match queries, and equality with the sort oracle.

Paths under test: the chunked PyTorch reference (evaluation's CPU path), the two Triton
rank-counting kernels (score slab for float32/float64 features, fused tensor-core for fp16/bf16;
interpreted on the CPU, compiled with a GPU) and the sort-based `retrieval_metrics_from_scores`
(the oracle).
"""
import math
import os

import pytest
import torch

from trpr import kernels
from trpr.kernels.reference import retrieval_metrics_from_scores, retrieval_metrics_reference
import trpr.kernels.retrieval
from trpr.kernels.retrieval import MAX_SLOTS, retrieval_metrics_triton

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# Four queries over a 5-item gallery; gallery item k has feature e_k, so a query's feature IS its
# score row. Gallery pids [1, 0, 1, 0, 1].
GALLERY_PIDS = [1, 0, 1, 0, 1]
HAND_SCORES = [
    [0.9, 0.8, 0.7, 0.6, 0.5],   # pid 1: matches at ranks 1, 3, 5 -> AP (1 + 2/3 + 3/5)/3, INP 3/5
    [0.5, 0.5, 0.5, 0.5, 0.5],   # pid 0: all tied, index order: matches at ranks 2, 4 -> AP 1/2, INP 1/2
    [0.5, 0.9, 0.5, 0.5, 0.1],   # pid 1: order 1,0,2,3,4: matches at ranks 2, 3, 5 -> AP (1/2+2/3+3/5)/3
    [0.1, 0.2, 0.3, 0.4, 0.5],   # pid 7: no match in the gallery
]
QUERY_PIDS = [1, 0, 1, 7]
EXPECTED_AP = [(1 + 2 / 3 + 3 / 5) / 3, 0.5, (1 / 2 + 2 / 3 + 3 / 5) / 3]
EXPECTED_INP = [3 / 5, 2 / 4, 3 / 5]
EXPECTED_FIRST = [1, 2, 2, 0]

PATHS = {
    "reference": lambda q, g, qp, gp, **kw: retrieval_metrics_reference(q, g, qp, gp, **kw),
    "triton": lambda q, g, qp, gp, **kw: retrieval_metrics_triton(q, g, qp, gp, **kw),
    "oracle": lambda q, g, qp, gp, **kw: retrieval_metrics_from_scores(q.double() @ g.double().t(), qp, gp, **kw),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_hand_computed_metrics_with_ties_and_a_query_without_match(path):
    query = torch.tensor(HAND_SCORES, device=DEVICE)
    gallery = torch.eye(5, device=DEVICE)
    with pytest.warns(UserWarning, match="1 of 4 queries have no match"):
        out = PATHS[path](query, gallery, torch.tensor(QUERY_PIDS), torch.tensor(GALLERY_PIDS),
                          ks=(1, 2, 5), per_query=True)
    assert out["R1"] == pytest.approx(25.0)
    assert out["R2"] == pytest.approx(75.0)
    assert out["R5"] == pytest.approx(75.0)
    assert out["mAP"] == pytest.approx(100 * sum(EXPECTED_AP) / 3)
    assert out["mINP"] == pytest.approx(100 * sum(EXPECTED_INP) / 3)
    assert out["first_rank"].tolist() == EXPECTED_FIRST
    assert torch.allclose(out["AP"][:3].double(), torch.tensor(EXPECTED_AP, dtype=torch.float64))
    assert torch.allclose(out["INP"][:3].double(), torch.tensor(EXPECTED_INP, dtype=torch.float64))
    assert math.isnan(out["AP"][3]) and math.isnan(out["INP"][3])


def test_public_dispatch_and_default_ks():
    query = torch.tensor(HAND_SCORES[:3], device=DEVICE)
    gallery = torch.eye(5, device=DEVICE)
    out = kernels.retrieval_metrics(query, gallery, torch.tensor(QUERY_PIDS[:3]), torch.tensor(GALLERY_PIDS))
    assert set(out) == {"R1", "R5", "R10", "mAP", "mINP"}
    assert out["R1"] == pytest.approx(100 / 3) and out["R10"] == pytest.approx(100.0)
    forced = kernels.retrieval_metrics(query, gallery, torch.tensor(QUERY_PIDS[:3]), torch.tensor(GALLERY_PIDS),
                                       backend="triton")
    assert forced == pytest.approx(out)
    with pytest.raises(ValueError, match="gallery_pids"):
        kernels.retrieval_metrics(query, gallery, torch.tensor(QUERY_PIDS[:3]), torch.tensor(GALLERY_PIDS[:4]))
    with pytest.raises(ValueError, match="same D"):
        kernels.retrieval_metrics(query, gallery[:, :4], torch.tensor(QUERY_PIDS[:3]), torch.tensor(GALLERY_PIDS))


def test_all_queries_without_match_give_nan_map():
    with pytest.warns(UserWarning):
        out = kernels.retrieval_metrics(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([9, 9, 8]),
                                        torch.arange(5))
    assert out["R1"] == 0.0 and math.isnan(out["mAP"]) and math.isnan(out["mINP"])


def _random_problem(n_queries, n_gallery, dim, n_pids, seed, integer=False):
    gen = torch.Generator().manual_seed(seed)
    if integer:    # small integer features: many exactly tied scores
        gallery = torch.randint(-1, 2, (n_gallery, dim), generator=gen).float()
        query = torch.randint(-1, 2, (n_queries, dim), generator=gen).float()
    else:
        gallery = torch.randn(n_gallery, dim, generator=gen)
        query = torch.randn(n_queries, dim, generator=gen)
    gallery_pids = torch.randint(0, n_pids, (n_gallery,), generator=gen)
    query_pids = torch.randint(0, n_pids, (n_queries,), generator=gen)
    return query.to(DEVICE), gallery.to(DEVICE), query_pids, gallery_pids


def _assert_same_metrics(out, oracle):
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert out[key] == pytest.approx(oracle[key], abs=1e-9), key
    assert torch.equal(out["first_rank"], oracle["first_rank"])
    assert torch.allclose(out["AP"], oracle["AP"], equal_nan=True, rtol=1e-12)
    assert torch.allclose(out["INP"], oracle["INP"], equal_nan=True, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:.*no match")
@pytest.mark.parametrize("integer", [False, True], ids=["random", "tied"])
def test_chunked_reference_equals_sort_oracle(integer):
    query, gallery, qp, gp = _random_problem(150, 230, 6 if integer else 32, 25, seed=1 + integer, integer=integer)
    oracle = retrieval_metrics_from_scores(query @ gallery.t(), qp, gp, per_query=True)
    out = retrieval_metrics_reference(query, gallery, qp, gp, per_query=True, query_block=37)
    _assert_same_metrics(out, oracle)


@pytest.mark.filterwarnings("ignore:.*no match")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["random_multi_tile", "tied", "many_matches"])
def test_triton_equals_sort_oracle(case, dtype):
    """float32/float64: the score-slab kernel; fp16/bf16: the fused kernel (scores of the rounded features)."""
    if case == "random_multi_tile":     # several query blocks and gallery tiles, D in chunks
        problem, blocks = _random_problem(45, 70, 40, 12, seed=7), (16, 32, 16, 4, 1)
    elif case == "tied":
        problem, blocks = _random_problem(40, 64, 5, 6, seed=8, integer=True), None
    else:                               # > MAX_SLOTS matches per query: several launches
        problem, blocks = _random_problem(12, 2 * MAX_SLOTS * 2 + 20, 16, 2, seed=9), None
    query, gallery, qp, gp = (problem[0].to(dtype), problem[1].to(dtype)) + problem[2:]
    oracle = retrieval_metrics_from_scores(query.double() @ gallery.double().t(), qp, gp, per_query=True)
    out = retrieval_metrics_triton(query, gallery, qp, gp, per_query=True, block_sizes=blocks)
    _assert_same_metrics(out, oracle)


@pytest.mark.filterwarnings("ignore:.*no match")
def test_score_slab_in_several_query_chunks(monkeypatch):
    monkeypatch.setattr(kernels.retrieval, "SCORE_SLAB_BYTES", 17 * 50 * 4)      # 17 queries per slab
    query, gallery, qp, gp = _random_problem(60, 50, 8, 7, seed=10)
    oracle = retrieval_metrics_from_scores(query @ gallery.t(), qp, gp, per_query=True)
    _assert_same_metrics(retrieval_metrics_triton(query, gallery, qp, gp, per_query=True), oracle)


def test_duplicate_gallery_items_tie_by_index():
    """Exact duplicates of a match rank by gallery index, in both kernels. Integer features keep
    every score exact whatever the summation order (the interpreter's numpy matmul rounds
    identical columns differently at different positions; the GPU's tensor cores do not)."""
    gen = torch.Generator().manual_seed(12)
    gallery = torch.randint(-2, 3, (20, 16), generator=gen).float()
    gallery[[3, 11, 17]] = gallery[7].clone()         # four identical items, pids 3, 1, 2 and 2
    gallery_pids = torch.arange(20) % 5
    query = gallery[[7, 0, 5]] + torch.randint(-1, 2, (3, 16), generator=gen).float()
    query_pids = gallery_pids[[7, 0, 5]]
    for dtype in (torch.float32, torch.float16):
        q, g = query.to(DEVICE, dtype), gallery.to(DEVICE, dtype)
        oracle = retrieval_metrics_from_scores(q.double() @ g.double().t(), query_pids, gallery_pids, per_query=True)
        _assert_same_metrics(retrieval_metrics_triton(q, g, query_pids, gallery_pids, per_query=True), oracle)


def test_chunked_reference_scores_in_float32_under_autocast():
    query, gallery, qp, gp = _random_problem(40, 60, 16, 8, seed=11)
    plain = retrieval_metrics_reference(query, gallery, qp, gp)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        under_autocast = retrieval_metrics_reference(query, gallery, qp, gp)
    assert under_autocast == plain
