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
    assert "skipping" in capsys.readouterr().err  # a diagnostic, not a result
    md = (tmp_path / "accuracy.md").read_text()
    # Rows written before the one vocabulary ("approx": "gelu+softmax") show under its label.
    assert "| a (rt) | exact | teacher |" in md and "0.7500 (n=4)" in md
    with pytest.raises(SystemExit):  # a wrong path is an error, not an unfinished run
        accuracy.main([str(tmp_path / "typo"), "--out", str(tmp_path)])
    assert "no such run folder" in capsys.readouterr().err
    assert json.loads((tmp_path / "accuracy.json").read_text()) == stored  # nothing lost


def test_cost_ratios_read_old_and_new_benchmark_rows(tmp_path):
    """Benchmark rows name their approximation ("approximation", or "variant" before)."""
    from experiments import accuracy
    from mpcformer_jax.approx import EXACT, Approximation

    rows = [{"variant": "exact", "bytes_vs_exact": 1.0},
            {"approximation": "quad+2quad", "label": "quad+2quad", "bytes_vs_exact": 0.1}]
    (tmp_path / "b.json").write_text(json.dumps(
        {"tables": [{"protocol": "ABY3", "shape": "base-128", "rows": rows}]}))
    costs = accuracy.cost_ratios(tmp_path / "b.json")
    assert costs[EXACT]["bytes_vs_exact"] == 1.0
    assert costs[Approximation.parse("quad+2quad")]["bytes_vs_exact"] == 0.1
    row = {"run": "a", "task": "rt", "model": "teacher", "approximation": EXACT.name,
           "plain_acc": 0.8, "n_test": 10, "private_acc": None, "n_private": 0,
           "plain_acc_subset": 0.8, "agreement": None}
    assert "| a (rt) | exact | teacher | 1.000 |" in accuracy.markdown([row], costs)
