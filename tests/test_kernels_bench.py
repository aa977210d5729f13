"""The kernel benchmark's plan and tables (the timings themselves are measured by running it)."""
from trpr.benchmarks.bench_kernels import loss_cases, loss_table, retrieval_table


def test_quick_plan_compiles_once_and_covers_the_goal_sizes():
    gpu = loss_cases(on_gpu=True, quick=True)
    assert [b for b, _, _ in gpu] == [128, 1024, 8192, 32768]
    assert [(b, d) for b, d, c in gpu if c] == [(8192, 2048)]
    full = loss_cases(on_gpu=True, quick=False)
    assert len(full) == 8 and all(c for _, _, c in full)
    assert max(b for b, _, _ in loss_cases(on_gpu=False, quick=False)) == 1024


def test_loss_table_puts_implementations_side_by_side_with_ratios():
    rows = [{"loss": "sdm", "B": 8192, "D": 2048, "impl": "GEMM bound", "status": "ok", "ms": 1.5},
            {"loss": "sdm", "B": 8192, "D": 2048, "impl": "triton", "status": "ok", "ms": 3.0, "peak_mib": 900.0},
            {"loss": "sdm", "B": 8192, "D": 2048, "impl": "eager", "status": "ok", "ms": 15.0, "peak_mib": 4000.0},
            {"loss": "sdm", "B": 8192, "D": 2048, "impl": "torch.compile", "status": "skipped (time budget)"}]
    header, _, line = loss_table(rows)
    assert header.split("|")[4:7] == [" triton ms ", " eager ms ", " compile ms "]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[:7] == ["sdm", "8192", "2048", "3.00", "15.00", "skipped (time budget)", "1.500"]
    assert cells[7:10] == ["–", "5.00x", "2.00x"]              # compile ÷ triton, eager ÷ triton, triton ÷ bound
    assert cells[10:] == ["900", "4000", "–"]


def test_retrieval_table_reports_speedup_and_identity():
    metrics = {"R1": 50.0, "R5": 70.0, "R10": 80.0, "mAP": 40.0, "mINP": 20.0}
    rows = [{"size": "CUHK-PEDES", "impl": "sort (full matrix)", "dtype": "float32", "status": "ok", "ms": 3.2,
             "metrics": metrics},
            {"size": "CUHK-PEDES", "impl": "triton", "dtype": "float32", "status": "ok", "ms": 0.8,
             "metrics": metrics, "identical_to_sort": True},
            {"size": "10^5 x 10^6", "impl": "triton", "dtype": "float16", "status": "ok", "ms": 250.0,
             "metrics": metrics, "checked_queries": 2000, "differing_queries": 3}]
    lines = retrieval_table(rows)
    assert "| 4.0x |" in lines[3] and "| True |" in lines[3]
    assert "1997 of 2000 sampled queries" in lines[4]
