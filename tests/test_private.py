"""Private inference in-process: configs, compile-once, fidelity and cost reports.

Tolerance: a tiny model (2 layers, hidden 32, quad + 2quad) in FM64 with 18 fraction bits
stays within 0.05 of the plaintext logits (measured: about 1e-4), and labels agree.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpcformer_jax.models import BertConfig, init_params
from mpcformer_jax.private import ConfigError, load_config, run
from mpcformer_jax.private.compile import cache_size
from mpcformer_jax.private.config import CONFIG_DIR
from mpcformer_jax.private.program import GROUPS

TOL = 0.05


@pytest.fixture(scope="module")
def tiny():
    config = BertConfig.tiny(hidden_act="quad", softmax_act="2quad", vocab_size=100)
    return config, init_params(config, 0)


@pytest.fixture(scope="module")
def batch(tiny):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tiny[0].vocab_size, (2, 8))
    mask = np.ones((2, 8), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name,protocol,n", [("aby3_3pc", "ABY3", 3), ("semi2k_2pc", "SEMI2K", 2),
                                             ("cheetah_2pc", "CHEETAH", 2),
                                             ("semi2k_2pc_local_trunc", "SEMI2K", 2)])
def test_ready_configs_load(name, protocol, n):
    cfg = load_config(name)
    assert (cfg.protocol, cfg.world_size) == (protocol, n)
    assert all(node.link[0] == "127.0.0.1" and node.io[0] == "127.0.0.1" for node in cfg.nodes)
    assert cfg.runtime_config().fxp_fraction_bits == 18
    assert load_config(CONFIG_DIR / f"{name}.json") == cfg


def _base():
    return json.loads((CONFIG_DIR / "aby3_3pc.json").read_text())


def _nodes(n, port=0):
    return [{"id": f"n{i}", "link": f"127.0.0.1:{port + i if port else 0}",
             "io": f"127.0.0.1:{port + 100 + i if port else 0}"} for i in range(n)]


@pytest.mark.parametrize("change,message", [
    ({"protocol": "SPDZ"}, "unknown protocol 'SPDZ'"),
    ({"nodes": _nodes(2)}, "ABY3 runs with (3,) node(s), the config lists 2"),
    ({"protocol": "CHEETAH", "nodes": _nodes(3)}, "CHEETAH runs with (2,) node(s)"),
    ({"nodes": [{"id": "a", "link": "127.0.0.1", "io": "127.0.0.1:0"}] + _nodes(2)},
     "bad address '127.0.0.1'"),
    ({"nodes": [{"id": "a", "link": "127.0.0.1:70000", "io": "127.0.0.1:0"}] + _nodes(2)},
     "bad port '70000'"),
    ({"nodes": [{"id": "a", "link": "127.0.0.1:9000", "io": "127.0.0.1:9000"}] + _nodes(2)},
     "duplicate port 127.0.0.1:9000"),
    ({"colour": "blue"}, "unknown field(s) ['colour']"),
    ({"runtime": {"fxp_fraction_bitz": 18}}, "unknown runtime field(s) ['fxp_fraction_bitz']"),
    ({"runtime": {"fxp_exp_mode": "EXP_WRONG"}}, "runtime.fxp_exp_mode: invalid value"),
    ({"compiler": {"enable_magic": True}}, "unknown field(s) ['enable_magic'] in"),
    ({"nodes": [{"id": "a", "link": "127.0.0.1:1", "io": "127.0.0.1:2", "tls": 1}] + _nodes(2)},
     "unknown field(s) ['tls']"),
    ({"timeout_s": -1}, "timeout_s must be a positive number"),
    ({"link": {"connect_retry_times": "x"}}, "link.connect_retry_times must be a int"),
    ({"link": {"recv_timeout_ms": -5}}, "link.recv_timeout_ms must not be negative"),
    ({"service": {"max_queue": 0}}, "service.max_queue must be >= 1"),
    ({"service": {"max_queue": 100_000}}, "service.max_queue must be at most 1024"),
    ({"service": {"queue": 3}}, "unknown field(s) ['queue'] in"),
])
def test_config_errors_say_what_is_wrong(change, message):
    with pytest.raises(ConfigError) as err:
        load_config({**_base(), **change})
    assert message in str(err.value)


def test_missing_config_lists_ready_ones():
    with pytest.raises(ConfigError, match="aby3_3pc"):
        load_config("no_such_config")


# ------------------------------------------------------------------ in-process runs


@pytest.mark.parametrize("protocol", ["ABY3", pytest.param("SEMI2K", marks=pytest.mark.slow)])
def test_private_logits_match_plaintext(tiny, batch, protocol):
    result = run(tiny, batch, protocol=protocol)
    assert result.logits.shape == (2, tiny[0].num_labels)
    assert result.max_abs_diff < TOL
    assert result.label_agreement == 1.0
    report = result.report
    assert report.protocol == protocol and report.total.bytes > 0 and report.total.messages > 0
    assert set(report.groups) == set(GROUPS)
    # Segment attribution: every group of the model costs something, and groups add up.
    for group in ("embedding", "linear", "attention_normaliser", "activation", "layernorm"):
        assert report.groups[group].bytes > 0, group
    assert abs(sum(g.bytes for g in report.groups.values()) - report.total.bytes) \
        <= 0.01 * report.total.bytes
    assert report.input_bytes["owner"] > report.input_bytes["client"] > 0


def test_semi2k_local_truncation_is_a_named_config_with_fewer_rounds(tiny, batch):
    local = load_config("semi2k_2pc_local_trunc")
    assert local.runtime_config().trunc_allow_msb_error
    assert not load_config("semi2k_2pc").runtime_config().trunc_allow_msb_error
    fast = run(tiny, batch, config=local)
    assert fast.max_abs_diff < TOL and fast.label_agreement == 1.0
    default = run(tiny, batch, protocol="SEMI2K", compare=False)
    # No opening per truncation: fewer rounds and fewer bytes for the same program.
    assert fast.report.total.rounds < default.report.total.rounds
    assert fast.report.total.bytes < default.report.total.bytes


@pytest.mark.slow  # compiles three shapes
def test_compiles_once_per_shape(tiny, batch):
    run(tiny, batch, protocol="ABY3", compare=False)
    before = cache_size()
    second = run(tiny, batch, protocol="SEMI2K", compare=False)  # same compiler options
    assert cache_size() == before and second.report.compile_s < 0.1
    longer = {"input_ids": np.zeros((2, 6), np.int32)}
    run(tiny, longer, protocol="ABY3", compare=False)
    assert cache_size() == before + 1


def test_ops_attribution_agrees_on_totals(tiny, batch):
    seg = run(tiny, batch, protocol="SEMI2K", compare=False).report
    ops = run(tiny, batch, protocol="SEMI2K", attribution="ops", compare=False).report
    assert abs(seg.total.bytes - ops.total.bytes) < 0.2 * ops.total.bytes
    assert "pphlo.dot" in ops.ops
    text = ops.format()
    assert "total sent" in text and "linear" in text


@pytest.mark.slow
def test_cheetah_in_process(tiny, batch):
    result = run(tiny, batch, protocol="CHEETAH")
    assert result.max_abs_diff < TOL and result.label_agreement == 1.0
    assert result.report.groups["embedding"].bytes > 0


def test_bad_inputs_say_what_to_do(tiny):
    with pytest.raises(ValueError, match="token ids must lie in"):
        run(tiny, {"input_ids": np.full((1, 4), 1000)}, protocol="ABY3")
    with pytest.raises(ValueError, match="no tokenizer"):
        run(tiny, ["some text"], protocol="ABY3")
    with pytest.raises(ConfigError, match="unknown protocol"):
        run(tiny, {"input_ids": np.zeros((1, 4), np.int32)}, protocol="SPDZ")


def test_profile_parser_reads_custom_calls():
    """SPU's native erf logs as a custom call; its bytes must land in a group, not vanish."""
    from mpcformer_jax.private.cost import CostReport, fill_report, parse_profile

    log = "\n".join([
        "[Profiling] SPU execution s003_activation completed, input processing took 1e-06s, "
        "execution took 0.02s, output processing took 1e-06s, total time 0.02s.",
        "[info] [api.cc:223] - pphlo.custom_call: mhlo.erf, executed 1 times, duration "
        "0.0107s, send bytes 10624 recv bytes 10816, send actions 85, recv actions 88",
        "[info] [api.cc:223] - pphlo.multiply, executed 1 times, duration 0.0008s, send bytes "
        "320 recv bytes 320, send actions 3, recv actions 3",
    ])
    by_exe, _, headers = parse_profile(log)
    assert headers == 1
    assert by_exe["s003_activation"]["pphlo.custom_call: mhlo.erf"].bytes == 10624
    report = CostReport("ABY3", 3)
    fill_report(report, by_exe, parties_logging=1)
    assert report.total.bytes == 10624 + 320
    assert report.groups["activation"].bytes == 10624 + 320
    assert report.total.messages == 85 + 3


def test_profile_rounds_are_the_largest_party_count_per_op():
    """One line per party per op (no rank): an op's rounds are the most messages one party
    sent in it; ops and executables run one after another, so their rounds add up."""
    from mpcformer_jax.private.cost import CostReport, fill_report, parse_profile

    def block(exe, ops):
        lines = [f"[Profiling] SPU execution {exe} completed, input processing took 1e-06s, "
                 "execution took 0.02s, output processing took 1e-06s, total time 0.02s."]
        lines += [f"- {op}, executed 1 times, duration 0.001s, send bytes 8 recv bytes 8, "
                  f"send actions {m}, recv actions {m}" for op, m in ops]
        return lines

    log = "\n".join(  # three parties, one block each per executable
        block("s001_layernorm", [("pphlo.rsqrt", 47), ("pphlo.multiply", 16)])
        + block("s001_layernorm", [("pphlo.rsqrt", 49), ("pphlo.multiply", 18)])
        + block("s001_layernorm", [("pphlo.rsqrt", 46), ("pphlo.multiply", 16)])
        + block("s002_linear", [("pphlo.dot", 2)]) + block("s002_linear", [("pphlo.dot", 3)])
        + block("s002_linear", [("pphlo.dot", 3)]))
    by_exe, _, _ = parse_profile(log)
    report = CostReport("ABY3", 3)
    fill_report(report, by_exe, parties_logging=3)
    assert report.groups["layernorm"].rounds == 49 + 18
    assert report.groups["linear"].rounds == 3
    assert report.total.rounds == 49 + 18 + 3
    assert report.total.messages == 47 + 49 + 46 + 16 + 18 + 16 + 8
    assert "rounds" in report.format()


def test_results_print_a_score_for_regression(capsys):
    """A one-output (regression) model prints its score, not a softmax over one class."""
    from mpcformer_jax.private.cli import print_results
    from mpcformer_jax.private.cost import CostReport
    from mpcformer_jax.private.roles.client import QueryResult, prediction

    rows = [prediction(t, lg, ["LABEL_0"], 3, False) for t, lg in (("a", [3.25]), ("b", [-1.5]))]
    print_results(QueryResult(rows, ["2x8"], CostReport("ABY3", 3), 1.0), as_json=True)
    out = json.loads(capsys.readouterr().out)["results"]
    assert [r["logits"] for r in out] == [[3.25], [-1.5]]
    assert out[0]["probabilities"] is None and out[0]["label"] is None
    pos = prediction("a", [0.0, 2.0], ["neg", "pos"], 40, True)
    assert pos.label == "pos" and pos.probabilities == {"neg": 0.1192, "pos": 0.8808}
    print_results(QueryResult([pos], ["1x32"], CostReport("ABY3", 3), 1.0), as_json=False)
    assert capsys.readouterr().out.startswith("pos\t0.881\ta\t(truncated)")


@pytest.mark.slow  # four SEMI2K executions
def test_semi2k_beaver_cache_opens_weights_once_per_runtime(tiny, batch):
    """A node's second query under SEMI2K opens only the activations' masks (the weights'
    are cached, model.with_cached_weights); the first pays them; answers equal plaintext.
    Under ABY3 (no Beaver triples) the mark changes nothing."""
    from mpcformer_jax.private.model import LOWERING, prepare

    assert LOWERING["SEMI2K"]["beaver_cache_weights"]
    off = {"beaver_cache_weights": False}
    cold = run(tiny, batch, protocol="SEMI2K")
    warm = run(tiny, batch, protocol="SEMI2K", warm_queries=1)
    warm_off = run(tiny, batch, protocol="SEMI2K", warm_queries=1, lowering=off)
    for r in (cold, warm, warm_off):
        assert r.max_abs_diff < 0.05 and r.label_agreement == 1.0
    assert cold.report.total.bytes == warm_off.report.total.bytes
    assert cold.report.total.rounds == warm.report.total.rounds  # openings merged, not cut
    # The weights' openings: 2 parties x 8 bytes x every kernel element (and the table).
    config, params = prepare(*tiny[:2], "SEMI2K")
    import jax
    weights = sum(np.size(w) for path, w in jax.tree_util.tree_leaves_with_path(params)
                  if jax.tree_util.keystr(path).endswith(("['kernel']", "['embedding']")))
    saved = cold.report.total.bytes - warm.report.total.bytes
    assert saved == pytest.approx(2 * 8 * weights, rel=0.1)
    assert "qkv" in params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]
    aby3 = run(tiny, batch, protocol="ABY3", warm_queries=1, lowering={"beaver_cache_weights":
                                                                        True})
    assert aby3.report.total.bytes == run(tiny, batch, protocol="ABY3").report.total.bytes
