"""trpr/benchmarks/search_folder.py at toy size: every measurement runs, the table names them, the
incremental update re-encodes exactly the rewritten files, and bad arguments are refused."""
import json

import pytest

from trpr.benchmarks import search_folder


def test_search_folder_benchmark_runs_small(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert search_folder.main(["--images", "30", "--queries", "3", "--update-fraction", "0.1", "--dataset",
                               "synth-pedes-tiny", "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("indexing from scratch", "rescan, nothing changed", "incremental update, 3 files changed (10 %)",
                  "query latency p50 / p95 (3 queries)"):
        assert label in printed
    result = json.loads(out.read_text())
    assert result["images"] == 30 and result["update_files"] == 3 and result["queries"] == 3
    assert result["index_images_per_s"] > 0 and 0 < result["query_p50_ms"] <= result["query_p95_ms"]
    assert len(list((tmp_path / "work" / "photos").iterdir())) == 30


def test_percentile_and_bad_arguments():
    assert search_folder.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert search_folder.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == pytest.approx(4.8)
    with pytest.raises(SystemExit):
        search_folder.main(["--update-fraction", "1.5"])
