"""Retrieval metrics on hand-built similarity matrices, through kernels and the HF `evaluate` module;
CMC curves, the published table and the leaderboard helpers."""
import math
from pathlib import Path

import pytest
import torch

from trpr import kernels
from trpr.metrics.cmc import cmc_curve
from trpr.metrics.published import PUBLISHED_RESULTS, published_for
from trpr.reporting.cmc import plot_cmc
from trpr.reporting.leaderboard import LeaderboardRow, markdown_table, mean_std_rows, reported_rows, sort_by_r1

ROOT = Path(__file__).resolve().parents[2]

# 3 queries × 5 gallery items, worked out by hand (ties rank by gallery index):
#   q0 (pid 0): order 1,2,4,3,0 -> matches (pid 0 at 2, 0) at ranks 2 and 5: AP = (1/2 + 2/5)/2 = 0.45, INP = 2/5
#   q1 (pid 1): order 1,4,... -> matches at ranks 1, 2: AP = 1, INP = 1
#   q2 (pid 2): all scores equal -> gallery order; its only match (index 3) at rank 4: AP = INP = 1/4
SCORES = torch.tensor([[0.1, 0.9, 0.8, 0.3, 0.5],
                       [0.2, 0.7, 0.1, 0.0, 0.6],
                       [0.5, 0.5, 0.5, 0.5, 0.5]])
QUERY_PIDS = torch.tensor([0, 1, 2])
GALLERY_PIDS = torch.tensor([0, 1, 0, 2, 1])
KS = (1, 3, 5)
EXPECTED = {"R1": 100 / 3, "R3": 200 / 3, "R5": 100.0, "mAP": 100 * (0.45 + 1 + 0.25) / 3,
            "mINP": 100 * (0.4 + 1 + 0.25) / 3}
EXPECTED_AP = [0.45, 1.0, 0.25]
EXPECTED_INP = [0.4, 1.0, 0.25]
EXPECTED_FIRST_RANK = [2, 1, 4]


def _check(result):
    for key, value in EXPECTED.items():
        assert float(result[key]) == pytest.approx(value, abs=1e-4), key


def test_kernels_on_hand_built_scores():
    _check(kernels.retrieval_metrics_from_scores(SCORES, QUERY_PIDS, GALLERY_PIDS, ks=KS))
    # features whose dot products are SCORES: queries = score rows, gallery = identity
    result = kernels.retrieval_metrics(SCORES, torch.eye(5), QUERY_PIDS, GALLERY_PIDS, ks=KS, per_query=True)
    _check(result)
    assert result["AP"].tolist() == pytest.approx(EXPECTED_AP, abs=1e-6)
    assert result["INP"].tolist() == pytest.approx(EXPECTED_INP, abs=1e-6)
    assert result["first_rank"].tolist() == EXPECTED_FIRST_RANK


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(ROOT / "trpr" / "metrics" / "text_person_retrieval"))


def test_evaluate_module_similarity_matrix(metric):
    result = metric.compute(predictions=SCORES.tolist(), references=QUERY_PIDS.tolist(),
                            gallery_pids=GALLERY_PIDS.tolist(), ks=KS, per_query=True)
    _check(result)
    assert result["AP"] == pytest.approx(EXPECTED_AP, abs=1e-6)
    assert result["first_rank"] == EXPECTED_FIRST_RANK


def test_evaluate_module_features(metric):
    result = metric.compute(predictions=SCORES, references=QUERY_PIDS, gallery_feats=torch.eye(5),
                            gallery_pids=GALLERY_PIDS, ks=KS)
    _check(result)


def test_evaluate_module_equals_kernels_on_random_features(metric):
    generator = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(120, 32, generator=generator), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(70, 32, generator=generator), dim=-1)
    query_pids = torch.randint(0, 20, (120,), generator=generator)
    gallery_pids = torch.cat([torch.arange(20), torch.randint(0, 20, (50,), generator=generator)])
    expected = kernels.retrieval_metrics(query, gallery, query_pids, gallery_pids, per_query=True)
    from_feats = metric.compute(predictions=query, references=query_pids, gallery_feats=gallery,
                                gallery_pids=gallery_pids, per_query=True)
    from_scores = metric.compute(predictions=query @ gallery.T, references=query_pids, gallery_pids=gallery_pids)
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert from_feats[key] == pytest.approx(float(expected[key]), abs=1e-5)
        assert from_scores[key] == pytest.approx(float(expected[key]), abs=1e-4)
    assert from_feats["first_rank"] == expected["first_rank"].tolist()
    assert 0 < from_feats["R1"] < from_feats["R10"] < 100  # a non-trivial case


def test_evaluate_module_rejects_mismatched_gallery(metric):
    with pytest.raises(ValueError, match="gallery_pids has 4 entries"):
        metric.compute(predictions=SCORES, references=QUERY_PIDS, gallery_pids=[0, 1, 0, 2])
    with pytest.raises(ValueError, match="gallery_feats must be"):
        metric.compute(predictions=SCORES, references=QUERY_PIDS, gallery_feats=torch.eye(4), gallery_pids=[0] * 4)


def test_cmc_curve_from_first_rank(tmp_path):
    curve = cmc_curve(torch.tensor(EXPECTED_FIRST_RANK), max_rank=6)
    assert curve == pytest.approx([100 / 3, 200 / 3, 200 / 3, 100, 100, 100])
    # rank 0 = no match in the gallery: never counted
    assert cmc_curve(torch.tensor([0, 1, 25]), max_rank=20)[-1] == pytest.approx(100 / 3)
    png = plot_cmc({"x": curve, "y": [c / 2 for c in curve]}, tmp_path / "cmc.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_table_matches_method_spec():
    assert len(PUBLISHED_RESULTS) == 15
    rde = {row.dataset: row.metrics for row in PUBLISHED_RESULTS if row.method.startswith("RDE")}
    assert rde["cuhk-pedes"] == {"R1": 75.94, "R5": 90.14, "R10": 94.12, "mAP": 67.56, "mINP": 51.44}
    assert [r.method for r in published_for("RSTPReid")][0] == "CLIP fine-tune"
    assert published_for("CUHK-PEDES") == published_for("cuhk-pedes")
    assert published_for("synth-pedes-tiny") == []
    cfam = [r for r in published_for("icfg-pedes") if r.method.startswith("CFAM")][0]
    assert cfam.metrics["mINP"] is None


def test_mean_std_rows_and_sorting():
    runs = [{"A+B/GE": {"R1": 60.0, "R5": 80.0, "R10": 90.0, "mAP": 50.0, "mINP": 30.0}},
            {"A+B/GE": {"R1": 64.0, "R5": 82.0, "R10": 90.0, "mAP": 54.0, "mINP": 34.0}}]
    (row,) = mean_std_rows("3RTPR seeds", runs, ["s0", "s1"])
    assert row.metrics["R1"] == pytest.approx(62.0)
    assert row.std["R1"] == pytest.approx(math.sqrt(8.0))  # sample std of (60, 64)
    assert row.std["R10"] == 0.0 and row.count == 2
    rows = sort_by_r1([row] + reported_rows(published_for("cuhk-pedes")))
    assert [r.metrics["R1"] for r in rows] == sorted((r.metrics["R1"] for r in rows), reverse=True)
    table = markdown_table(rows, rank=True)
    assert "| 1 | RDE (CVPR'24) | 75.94 |" in table
    assert "62.00 ± 2.83" in table and "ours (mean ± std), n=2" in table
    assert "| – | reported |" in table  # CFAM's missing mINP
    with pytest.raises(ValueError, match="at least 2"):
        mean_std_rows("x", runs[:1], ["s0"])


def test_markdown_table_row_order_without_ranking():
    rows = [LeaderboardRow("b", {"R1": 1.0, "R5": 2.0, "R10": 3.0, "mAP": 4.0, "mINP": 5.0}, source="p"),
            LeaderboardRow("a", {"R1": 9.0, "R5": 9.0, "R10": 9.0, "mAP": 9.0, "mINP": 9.0}, source="q")]
    lines = markdown_table(rows).splitlines()
    assert lines[2].startswith("| b | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | ours | p |")
    assert lines[3].startswith("| a |")
