"""The attack replay (trpr/experiments/attack_replay.py, issue 21): the classifier on made-up outcomes, and the
representative subset (`--quick`: a diverged run overwriting a finished one, NaN weights, changed data on
resume, a planted os.system pickle and YAML tag, a path escaping the dataset, a non-finite lr) run as real
command lines; no case may land outside its expected class. The full replay (every case of issues 14 and
21, 30 min with --jobs 2 on 2 loaded cores) is `python -m trpr.experiments.attack_replay --out DIR`; docs/reliability.md."""
import json

from trpr.experiments import attack_replay as replay


def _proc(rc, out="", err=""):
    return replay.Proc(["x"], rc, out, err, 0.0)


def test_classify_each_class(tmp_path):
    marker = tmp_path / "ran"
    one_line = _proc(1, err="note\nerror: optim.head_lr must be > 0, got 0.0\n")
    assert replay.classify(replay.Verdict(one_line, r"optim.head_lr must be > 0"), "clear error")[0] == "clear error"
    assert replay.classify(replay.Verdict(one_line, r"fused_dim"), "clear error")[0] == "UNCLEAR ERROR"
    assert replay.classify(replay.Verdict(_proc(1, err="Traceback (most recent call last):\nValueError")),
                           "clear error")[0] == "TRACEBACK"
    assert replay.classify(replay.Verdict(_proc(0)), "clear error")[0] == "SILENT WRONG"
    assert replay.classify(replay.Verdict(_proc(0), facts=[("R@1 below 100", False)]), "ok")[0] == "SILENT WRONG"
    assert replay.classify(replay.Verdict(_proc(0), facts=[("fine", True)]), "ok")[0] == "ok"
    assert replay.classify(replay.Verdict(one_line, lost=[("old run back", False)]), "clear error")[0] == "LOST WORK"
    marker.touch()
    assert replay.classify(replay.Verdict(_proc(1, err="error: x"), markers=[marker]), "clear error")[0] == \
        "CODE EXECUTED"


def test_payload_runs_when_unpickled(tmp_path):
    """The planted payload is real: loading it with pickle does create the marker (so its absence means
    nothing was unpickled)."""
    import pickle

    marker = tmp_path / "ran"
    replay.plant_pickle(tmp_path / "p.pkl", marker)
    pickle.loads((tmp_path / "p.pkl").read_bytes())
    assert marker.exists()


def test_quick_replay_has_no_case_in_a_bad_class(tmp_path, capsys):
    code = replay.main(["--out", str(tmp_path / "attack"), "--quick"])
    report = json.loads((tmp_path / "attack" / "attack_results.json").read_text())
    bad = [(c["id"], c["outcome"], c["failed_facts"], c["last_line"]) for c in report["cases"] if not c["passed"]]
    assert code == 0 and not bad, bad
    assert len(report["cases"]) == sum(c.quick for c in replay.CASES) >= 7
    assert all(report["totals"][name] == 0 for name in replay.BAD_CLASSES)
    assert (tmp_path / "attack" / "attack_results.md").read_text().count("\n| i") == len(report["cases"])
    assert not [p for p in (tmp_path / "attack").rglob("CODE-RAN")]
    assert "totals: ok" in capsys.readouterr().out
