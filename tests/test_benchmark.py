"""Benchmark library: network model arithmetic, extrapolation, writers, and a tiny ABY3 run."""

import dataclasses
import json

import pytest

from mpcformer_jax.approx import EXACT, FLOOR, Approximation
from mpcformer_jax.bench import network, report
from mpcformer_jax.bench.records import GroupCost, Record, extrapolate
from mpcformer_jax.bench.variants import SHAPES, get_variants

QUAD = Approximation.parse("quad+2quad")


def test_latency_terms():
    net = network.Network("test", bandwidth_bps=8e9, latency_s=1e-3)  # 1 GB/s, 1 ms
    est = network.latency(net, compute_s=2.0, bytes_=3e9, rounds=100, parties=3,
                          client_bytes=1e9)
    assert est["transfer_s"] == pytest.approx(1.0)   # 1e9 bytes per party at 1 GB/s
    assert est["rounds_s"] == pytest.approx(0.1)     # 100 rounds of 1 ms
    assert est["upload_s"] == pytest.approx(1.0)
    assert est["total_s"] == pytest.approx(4.1)
    assert network.LAN.bandwidth_bps == 10e9 and network.WAN.latency_s == 0.04


def _old_record(label, layers, fixed=10.0, per_layer=5.0, shape="tiny-16"):
    """A raw record as written before Records existed: a dict keyed "variant", no rounds."""
    val = fixed + per_layer * layers
    groups = {g: {"bytes": val / 6, "messages": val, "wall_s": val / 60}
              for g in report.GROUPS[:-1]}
    return {"variant": label, "protocol": "ABY3", "shape": shape, "seq_len": 16,
            "layers": layers, "parties": 3, "runtime": {}, "compiler": {},
            "wall_s": val / 10, "cpu_s": val / 5, "cpu_method": "party_threads",
            "compile_s": 1.0, "total_s": 2.0,
            "bytes": val * 2**30, "messages": val, "groups": groups,
            "client_bytes": 1000, "max_abs_diff": 1e-3, "label_agreement": 1.0}


def _record(approximation, layers, fixed=10.0, per_layer=5.0, shape="tiny-16"):
    """A Record with measured rounds: 0.4 x messages, in total and in every group."""
    val = fixed + per_layer * layers
    groups = {g: GroupCost(val / 6, val, 0.4 * val / 6, val / 60) for g in report.GROUPS[:-1]}
    return Record(approximation=approximation, protocol="ABY3", shape=shape, seq_len=16,
                  layers=layers, parties=3, wall_s=val / 10, bytes=val * 2**30, messages=val,
                  rounds=0.4 * val, rounds_method=network.MEASURED, groups=groups,
                  client_bytes=1000, max_abs_diff=1e-3, label_agreement=1.0, cpu_s=val / 5,
                  cpu_method="party_threads", compile_s=1.0, total_s=2.0)


def test_record_json_round_trip():
    rec = _record(QUAD, 2)
    assert Record.from_json(rec.to_json()) == rec
    full = extrapolate(_record(QUAD, 1), rec, 12)
    assert Record.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    assert json.loads(rec.to_json())["approximation"] == "quad+2quad"


def test_old_format_record_loads_without_rounds(tmp_path):
    rec = Record.from_dict(_old_record("exact", 1))
    assert rec.approximation == EXACT and rec.label == "exact"
    assert rec.rounds is None and rec.groups["linear"].rounds is None
    assert rec.rounds_method is None and rec.public_table is False
    # A store file of old records loads, and is written back in the new format.
    (tmp_path / "raw.json").write_text(json.dumps([_old_record("floor", n) for n in (1, 2)]))
    store = report.Store(tmp_path / "raw.json")
    assert store.find(protocol="ABY3", shape="tiny-16", approximation=FLOOR, layers=2)
    store.add(_record(QUAD, 1))
    stored = json.loads((tmp_path / "raw.json").read_text())
    assert [r["approximation"] for r in stored] == ["identity+identity"] * 2 + ["quad+2quad"]
    # Rows of old records take messages / parties for rounds, and say so.
    shape = dataclasses.replace(SHAPES["tiny-16"], layers=12)
    row = report.build_rows([report.full_depth(store, "ABY3", shape, FLOOR)])[0]
    assert row["rounds"] == pytest.approx(70 / 3)
    assert row["rounds_method"] == network.FROM_MESSAGES
    assert "~23" in report.markdown([row], "t") and "| - |" in report.group_table([row], "rounds")
    with pytest.raises(ValueError, match="not known"):
        Record.from_dict({**_old_record("exact", 1), "colour": "red"})


def test_extrapolation_is_linear_in_layers():
    full = extrapolate(_record(EXACT, 1), _record(EXACT, 2), 12)
    assert full.bytes == pytest.approx(70 * 2**30)
    assert full.messages == pytest.approx(70)
    assert full.rounds == pytest.approx(0.4 * 70)  # rounds extrapolate like bytes
    assert full.groups["linear"].bytes == pytest.approx(70 / 6)
    assert full.groups["linear"].rounds == pytest.approx(0.4 * 70 / 6)
    assert full.extrapolated_from == (1, 2) and full.layers == 12
    old = extrapolate(Record.from_dict(_old_record("exact", 1)),
                      Record.from_dict(_old_record("exact", 2)), 12)
    assert old.rounds is None and old.bytes == pytest.approx(70 * 2**30)
    with pytest.raises(ValueError):
        extrapolate(_record(EXACT, 2), _record(EXACT, 2), 12)


def test_network_latency_uses_measured_rounds():
    rec = dataclasses.replace(_record(QUAD, 2), rounds=1000.0, messages=9000.0)
    row = report.build_rows([rec])[0]
    assert row["rounds"] == 1000.0 and row["rounds_method"] == network.MEASURED
    # 1000 rounds of 40 ms, not 9000 / 3 messages per party
    assert row["WAN"]["rounds_s"] == pytest.approx(1000 * network.WAN.latency_s)


def test_store_rows_and_writers(tmp_path):
    store = report.Store(tmp_path / "raw.json")
    shape = SHAPES["base-128"]  # 12 layers, fit on 1 and 2
    for a, per_layer in ((EXACT, 20.0), (QUAD, 4.0), (FLOOR, 2.0)):
        for n in (1, 2):
            store.add(_record(a, n, per_layer=per_layer, shape=shape.name))
    store.add(_record(FLOOR, 2, per_layer=2.0, shape=shape.name))  # replaces, not duplicates
    assert len(report.Store(tmp_path / "raw.json").records) == 6
    # A run under another lowering is another record, found only under that lowering.
    per_head = dataclasses.replace(_record(FLOOR, 2, per_layer=3.0, shape=shape.name),
                                   lowering={"block_diagonal_heads": False})
    store.add(per_head)
    assert len(store.records) == 7
    assert store.find(protocol="ABY3", shape=shape.name, approximation=FLOOR, layers=2,
                      lowering={"block_diagonal_heads": False}) == per_head
    assert store.find(protocol="ABY3", shape=shape.name, approximation=FLOOR,
                      layers=2) != per_head
    store.records.remove(per_head)
    recs = [report.full_depth(store, "ABY3", shape, a) for a in (EXACT, QUAD, FLOOR)]
    # A table takes one method for every row: extrapolated while a row lacks a real
    # 12-layer run, the real runs once every row has one.
    assert report.table_records(store, "ABY3", shape, (EXACT, QUAD, FLOOR)) == recs
    for a, per_layer in ((EXACT, 21.0), (QUAD, 4.5)):
        store.add(_record(a, 12, per_layer=per_layer, shape=shape.name))
    assert report.table_records(store, "ABY3", shape, (EXACT, QUAD, FLOOR)) == recs
    store.add(_record(FLOOR, 12, per_layer=2.5, shape=shape.name))
    real = report.table_records(store, "ABY3", shape, (EXACT, QUAD, FLOOR))
    assert [r.layers for r in real] == [12] * 3 and not any(r.extrapolated_from for r in real)
    assert [r.wall_s for r in real] == \
        [store.find(protocol="ABY3", shape=shape.name, approximation=a, layers=12).wall_s
         for a in (EXACT, QUAD, FLOOR)]
    assert real[1].wall_s != recs[1].wall_s
    for r in real:
        store.records.remove(store.find(protocol="ABY3", shape=shape.name,
                                        approximation=r.approximation, layers=12))
    rows = report.build_rows(recs)
    q = rows[1]
    assert q["bytes_vs_floor"] == pytest.approx((10 + 48) / (10 + 24))
    assert q["bytes_vs_exact"] == pytest.approx((10 + 48) / (10 + 240))
    assert q["rounds"] == pytest.approx(0.4 * 58) and q["rounds_vs_floor"] == pytest.approx(58 / 34)
    assert q["LAN"]["rounds_s"] == pytest.approx(0.4 * 58 * network.LAN.latency_s)
    assert rows[0]["LAN_speedup_vs_exact"] == pytest.approx(1.0)
    assert q["LAN_speedup_vs_exact"] > 1.0
    md = report.markdown(rows, "t")
    assert md.count("\n| ") == 4 and "quad+2quad" in md and "*" in md
    head = md.splitlines()[2].split(" | ")
    assert "rounds" in head and md.splitlines()[5].split(" | ")[head.index("rounds")] == "23*"
    assert "layernorm" in report.group_table(rows)
    rounds_table = report.group_table(rows, "rounds")
    assert "total" in rounds_table and "| floor | " in rounds_table
    targets = report.check_targets([{"protocol": "ABY3", "shape": "base-128", "rows": rows}])
    assert targets[0]["value"] == pytest.approx(58 / 34) and targets[0]["met"] is False
    assert targets[2]["value"] == pytest.approx(250 / 58) and targets[2]["extrapolated"]
    assert targets[2]["floor_value"] == pytest.approx(250 / 34)  # the best any variant can do
    assert targets[3]["value"] is None and targets[3]["met"] is None  # no seq-512 table
    assert "not measured" in report.targets_markdown(targets)
    store.add(dataclasses.replace(_record(FLOOR, 12, per_layer=2.0, shape=shape.name),
                                  bytes=35 * 2**30))
    check = report.validation(store, "ABY3", shape, FLOOR)
    assert check["bytes"] == {"measured": 35 * 2**30, "extrapolated": pytest.approx(34 * 2**30)}
    assert "35.000 / 34.000" in report.validation_markdown([check])
    report.figure({"t": rows}, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    json.dumps(rows)


def test_unknown_variant_lists_valid():
    with pytest.raises(ValueError, match="or be 'exact' or 'floor'. Activations: gelu"):
        get_variants(["nope"])
    from experiments.benchmark import main

    # The CLI says the same in one line, before any measurement.
    with pytest.raises(SystemExit, match="Unknown softmax approximation 'bad'"):
        main(["--variants", "quad+bad", "--report-only"])


@pytest.mark.slow  # compiles and runs two variants under SPU
def test_small_run_two_variants(tmp_path):
    from experiments.benchmark import main

    tables = main(["--small", "--variants", "quad+2quad", "floor", "--out", str(tmp_path)])
    rows = {r["label"]: r for r in tables[0]["rows"]}
    assert rows["floor"]["bytes_vs_floor"] == 1.0
    assert rows["quad+2quad"]["bytes"] > rows["floor"]["bytes"] > 0
    assert all(r["max_abs_diff"] < 0.05 and r["label_agreement"] == 1.0 for r in rows.values())
    assert sum(g["bytes"] for g in rows["quad+2quad"]["groups"].values()) > 0
    # Measured rounds: at least messages / parties (the largest party's count, not the mean),
    # and the groups' rounds add up to the total.
    for r in rows.values():
        assert r["rounds_method"] == network.MEASURED
        assert r["messages"] / r["parties"] <= r["rounds"] < r["messages"]
        assert sum(g["rounds"] for g in r["groups"].values()) == pytest.approx(r["rounds"])
    for suffix in ("_raw.json", ".json", ".md", ".png"):
        assert (tmp_path / f"benchmark{suffix}").exists()


@pytest.mark.slow  # three SPU runs of a 2-4 layer model: ~30 s
def test_mixed_norm_runs_deeper_fit_layers_and_extrapolates_exactly():
    from mpcformer_jax.bench.measure import measure
    from mpcformer_jax.bench.variants import SHAPES, Shape, Variant

    base = SHAPES["base-128"]
    assert base.fit_layers_for(Approximation.parse("quad+2quad+affine@2")) == (2, 3)
    assert base.fit_layers_for(Approximation.parse("quad+2quad+affine@0:5")) == (4, 5)
    assert base.fit_layers_for(Approximation.parse("quad+2quad")) == (1, 2)
    # Layer 1 keeps an exact LayerNorm (site 3): runs at 3 and 4 layers (the last layer of
    # each, computed for [CLS] alone, an ordinary one), extrapolated to 5, give the 5-layer
    # run's messages and bytes (every layer after the second is alike).
    shape, variant = Shape("tiny-5", 8, 5, small=True), Variant.of("quad+2quad+affine@3")
    r3, r4, r5 = (measure(variant, shape, "ABY3", n) for n in (3, 4, 5))
    assert shape.fit_layers_for(variant.approximation) == (3, 4)
    full = extrapolate(r3, r4, 5)
    assert full.messages == pytest.approx(r5.messages)
    assert full.bytes == pytest.approx(r5.bytes, rel=1e-3)
    assert r4.groups["layernorm"].messages > 0


@pytest.mark.slow  # a profiled SPU run
def test_compute_accounting_of_a_served_query(tiny_student, tmp_path, capsys):
    from experiments import compute_accounting as ca
    from mpcformer_jax.models import load_pretrained
    from mpcformer_jax.private.model import prepared_config

    config, _, _ = load_pretrained(tiny_student)
    prepared = prepared_config(config, "ABY3")
    assert prepared.block_diagonal_heads
    assert prepared.cls_only_last_layer
    h, heads, layers = config.hidden_size, config.num_attention_heads, 3
    prepared = prepared.replace(num_hidden_layers=layers)
    sites = {s.name: s for s in ca.linear_sites(prepared, 2, 8)}
    assert (sites["qkv"].m, sites["qkv"].k, sites["qkv"].n) == (16, h, 3 * h)
    assert sites["qkv"].runs == layers  # K and V of every token in the last layer too
    # every row in the first layers, [CLS] alone (one row per sequence) in the last one
    last = " (last layer, [CLS])"
    assert sites["ffn in"].macs_needed == 16 * h * prepared.intermediate_size * (layers - 1)
    assert sites["ffn in" + last].macs_needed == 2 * h * prepared.intermediate_size
    scores = sites["attention scores"]  # block-diagonal: heads x the products it needs
    assert (scores.m, scores.k, scores.n, scores.runs) == (8, h, heads * 8, 2 * (layers - 1))
    assert scores.macs_executed == heads * scores.macs_needed
    assert (sites["attention scores" + last].m, sites["attention scores" + last].runs) == (1, 2)
    per_head = {s.name: s for s in ca.linear_sites(
        prepared.replace(block_diagonal_heads=False), 2, 8)}["attention scores"]
    assert per_head.macs_executed == per_head.macs_needed == scores.macs_needed
    every_row = {s.name for s in ca.linear_sites(prepared.replace(cls_only_last_layer=False), 2, 8)}
    assert not any(last in name for name in every_row)

    assert ca.main([str(tiny_student), "--bucket", "1x8", "--json",
                    "--out", str(tmp_path / "acc")]) == 0
    acc = json.loads(capsys.readouterr().out)  # stdout: the JSON alone
    assert acc["label_agreement"] == 1.0 and acc["max_abs_diff"] < 0.05
    groups = acc["groups"]
    assert groups["linear"]["seconds"] > 0 and groups["activation"]["seconds"] > 0
    assert acc["seconds_per_party"] == pytest.approx(sum(g["seconds"] for g in groups.values()))
    # Every group's op breakdown adds up to its time; the linear group's time is mostly dots.
    for g, ops in acc["ops"].items():
        assert sum(ops.values()) == pytest.approx(groups[g]["seconds"], rel=1e-6, abs=1e-9)
    assert any("dot" in op for op in acc["ops"]["linear"])
    assert acc["linear_gemm_bound_s"] > 0 and acc["linear_vs_gemm_bound"] > 0
    assert all(r["spu_gmacs_per_s"] > 0 and r["numpy_int64_gmacs_per_s"] > 0
               for r in acc["linear"])
    assert "GEMM-bound" in (tmp_path / "acc.md").read_text()
    with pytest.raises(SystemExit):
        ca.main([str(tmp_path / "nowhere")])
    assert "no model folder" in capsys.readouterr().err
