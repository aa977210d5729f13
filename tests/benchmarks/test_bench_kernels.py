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


def test_loss_rows_are_written_before_any_compile_case(tmp_path, monkeypatch):
    """The report on disk already holds every Triton and eager row when the first torch.compile starts, and
    the compile rows come last; --compile off skips them and says so in the notes (issue 24)."""
    import json

    import torch

    from trpr.benchmarks import bench_kernels

    monkeypatch.setattr(bench_kernels, "loss_cases", lambda on_gpu, quick: [(8, 16, True)])
    on_disk = []

    def fake_compile(function, **kwargs):
        on_disk.append(json.loads((tmp_path / "kernels_cpu_quick.json").read_text())["losses"])
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    bench_kernels.main(["--quick", "--device", "cpu", "--skip-retrieval", "--out", str(tmp_path), "--repeats", "1",
                        "--budget-s", "1000"])
    impls = [(r["loss"], r["impl"], r["status"]) for r in on_disk[0]]
    assert {("sdm", "triton", "ok"), ("sdm", "eager", "ok"), ("trl", "triton", "ok"), ("trl", "eager", "ok")} \
        <= set(impls), impls
    final = json.loads((tmp_path / "kernels_cpu_quick.json").read_text())
    assert [r["impl"] for r in final["losses"]][-2:] == ["torch.compile", "torch.compile"]
    assert len(on_disk) == 2 and not list(tmp_path.glob(".*.tmp"))

    bench_kernels.main(["--quick", "--device", "cpu", "--skip-retrieval", "--out", str(tmp_path), "--repeats", "1",
                        "--compile", "off"])
    final = json.loads((tmp_path / "kernels_cpu_quick.json").read_text())
    assert [r["status"] for r in final["losses"] if r["impl"] == "torch.compile"] == ["skipped (--compile off)"] * 2
    assert any(note.startswith("FALLBACK: torch.compile off") for note in final["notes"])
    assert "FALLBACK: torch.compile off" in (tmp_path / "kernels_cpu_quick.md").read_text()


def test_fallback_notes_name_the_out_dtype_probe_and_a_missing_triton(monkeypatch):
    import torch

    from trpr import kernels
    from trpr.benchmarks.bench_kernels import fallback_notes
    from trpr.kernels import slab

    monkeypatch.setattr(slab, "_OUT_DTYPE_SUPPORTED", {"cuda": False})
    monkeypatch.setattr(slab, "_OUT_DTYPE_ERRORS", {"cuda": "TypeError: unexpected keyword out_dtype"})
    notes = fallback_notes(torch.device("cuda"), compile_enabled=True)
    assert len(notes) == 1 and notes[0].startswith("FALLBACK: torch.mm(out_dtype=float32) probe failed")
    assert "unexpected keyword out_dtype" in notes[0] and "upcast" in notes[0]
    monkeypatch.setattr(slab, "_OUT_DTYPE_SUPPORTED", {"cuda": True})
    assert fallback_notes(torch.device("cuda"), compile_enabled=True) == []
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert fallback_notes(torch.device("cuda"), compile_enabled=True)[0].startswith("FALLBACK: triton is not installed")
