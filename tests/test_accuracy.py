"""experiments/accuracy.py: its table keeps the rows of runs it did not evaluate."""

import json

import pytest


def test_accuracy_table_keeps_rows_of_other_runs(tmp_path, capsys):
    """Evaluating run B must not drop run A's rows; an unfinished run is skipped, not erased."""
    from experiments import accuracy

    row = {"task": "rt", "model": "teacher", "approx": "gelu+softmax", "plain_acc": 0.8,
           "n_test": 10, "private_acc": 0.75, "n_private": 4, "plain_acc_subset": 0.75,
           "agreement": 1.0}
    stored = [{**row, "run": "a"}, {**row, "run": "b"}]
    (tmp_path / "accuracy.json").write_text(json.dumps(stored))
    (tmp_path / "b").mkdir()  # no results.json: still training
    rows = accuracy.main([str(tmp_path / "b"), "--out", str(tmp_path),
                          "--benchmark", str(tmp_path / "none.json")])
    assert [r["run"] for r in rows] == ["a", "b"]
    assert "skipping" in capsys.readouterr().out
    md = (tmp_path / "accuracy.md").read_text()
    assert "| a (rt) | gelu+softmax | teacher |" in md and "0.7500 (n=4)" in md
    with pytest.raises(SystemExit):  # a wrong path is an error, not an unfinished run
        accuracy.main([str(tmp_path / "typo"), "--out", str(tmp_path)])
    assert "no such run folder" in capsys.readouterr().err
    assert json.loads((tmp_path / "accuracy.json").read_text()) == stored  # nothing lost
