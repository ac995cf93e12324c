"""Benchmark library: network model arithmetic, extrapolation, writers, and a tiny ABY3 run."""

import json

import pytest

from mpcformer_jax.bench import network, report
from mpcformer_jax.bench.measure import extrapolate
from mpcformer_jax.bench.variants import SHAPES, get_variants


def test_latency_terms():
    net = network.Network("test", bandwidth_bps=8e9, latency_s=1e-3)  # 1 GB/s, 1 ms
    est = network.latency(net, compute_s=2.0, bytes_=3e9, messages=300, parties=3,
                          client_bytes=1e9)
    assert est["transfer_s"] == pytest.approx(1.0)   # 1e9 bytes per party at 1 GB/s
    assert est["rounds_s"] == pytest.approx(0.1)     # 100 rounds of 1 ms
    assert est["upload_s"] == pytest.approx(1.0)
    assert est["total_s"] == pytest.approx(4.1)
    assert network.LAN.bandwidth_bps == 10e9 and network.WAN.latency_s == 0.04


def _record(variant, layers, fixed=10.0, per_layer=5.0):
    val = fixed + per_layer * layers
    groups = {g: {"bytes": val / 6, "messages": val, "wall_s": val / 60} for g in report.GROUPS}
    return {"variant": variant, "protocol": "ABY3", "shape": "tiny-16", "seq_len": 16,
            "layers": layers, "parties": 3, "runtime": {}, "compiler": {},
            "wall_s": val / 10, "cpu_s": val / 5, "cpu_method": "party_threads",
            "bytes": val * 2**30, "messages": val, "groups": groups,
            "client_bytes": 1000, "max_abs_diff": 1e-3, "label_agreement": 1.0}


def test_extrapolation_is_linear_in_layers():
    full = extrapolate(_record("exact", 1), _record("exact", 2), 12)
    assert full["bytes"] == pytest.approx(70 * 2**30)
    assert full["messages"] == pytest.approx(70)
    assert full["groups"]["linear"]["bytes"] == pytest.approx(70 / 6)
    assert full["extrapolated_from"] == [1, 2] and full["layers"] == 12
    with pytest.raises(ValueError):
        extrapolate(_record("exact", 2), _record("exact", 2), 12)


def test_store_rows_and_writers(tmp_path):
    store = report.Store(tmp_path / "raw.json")
    for name, per_layer in (("exact", 20.0), ("quad+2quad", 4.0), ("floor", 2.0)):
        for n in (1, 2):
            store.add(_record(name, n, per_layer=per_layer))
    store.add(_record("floor", 2, per_layer=2.0))  # replaces, does not duplicate
    assert len(report.Store(tmp_path / "raw.json").records) == 6
    shape = SHAPES["base-128"]  # 12 layers, fit on 1 and 2 (records say tiny-16: relabel)
    for r in store.records:
        r["shape"] = shape.name
    recs = [report.full_depth(store, "ABY3", shape, v) for v in ("exact", "quad+2quad", "floor")]
    rows = report.build_rows(recs)
    q = rows[1]
    assert q["bytes_vs_floor"] == pytest.approx((10 + 48) / (10 + 24))
    assert q["bytes_vs_exact"] == pytest.approx((10 + 48) / (10 + 240))
    assert rows[0]["LAN_speedup_vs_exact"] == pytest.approx(1.0)
    assert q["LAN_speedup_vs_exact"] > 1.0
    md = report.markdown(rows, "t")
    assert md.count("\n| ") == 4 and "quad+2quad" in md and "*" in md
    assert "layernorm" in report.group_table(rows)
    targets = report.check_targets([{"protocol": "ABY3", "shape": "base-128", "rows": rows}])
    assert targets[0]["value"] == pytest.approx(58 / 34) and targets[0]["met"] is False
    assert targets[2]["value"] == pytest.approx(250 / 58) and targets[2]["extrapolated"]
    assert targets[2]["floor_value"] == pytest.approx(250 / 34)  # the best any variant can do
    assert targets[3]["value"] is None and targets[3]["met"] is None  # no seq-512 table
    assert "not measured" in report.targets_markdown(targets)
    store.add({**_record("floor", 12, per_layer=2.0), "shape": shape.name, "bytes": 35 * 2**30})
    check = report.validation(store, "ABY3", shape, "floor")
    assert check["bytes"] == {"measured": 35 * 2**30, "extrapolated": pytest.approx(34 * 2**30)}
    assert "35.000 / 34.000" in report.validation_markdown([check])
    report.figure({"t": rows}, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    json.dumps(rows)


def test_unknown_variant_lists_valid():
    with pytest.raises(ValueError, match="available: exact"):
        get_variants(["nope"])


def test_small_run_two_variants(tmp_path):
    from experiments.benchmark import main

    tables = main(["--small", "--variants", "quad+2quad", "floor", "--out", str(tmp_path)])
    rows = {r["variant"]: r for r in tables[0]["rows"]}
    assert rows["floor"]["bytes_vs_floor"] == 1.0
    assert rows["quad+2quad"]["bytes"] > rows["floor"]["bytes"] > 0
    assert all(r["max_abs_diff"] < 0.05 and r["label_agreement"] == 1.0 for r in rows.values())
    assert sum(g["bytes"] for g in rows["quad+2quad"]["groups"].values()) > 0
    for suffix in ("_raw.json", ".json", ".md", ".png"):
        assert (tmp_path / f"benchmark{suffix}").exists()
