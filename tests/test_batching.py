"""Cross-client batching: the batcher's plan, joining shares locally, and a served model
whose clients' queries share executions (each client gets exactly its own rows back).

Tolerance as in test_service.py: |private - plaintext| < 0.05.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import plaintext_logits

from mpcformer_jax.private import Client, Service, load_config, transport
from mpcformer_jax.private.batching import Stats, Waiting, plan_batch
from mpcformer_jax.private.roles.client import QueryError, read_endpoint
from mpcformer_jax.private.shares import ShareError, join_rows, shape_of, split_rows
from mpcformer_jax.private.status import merge_stats

TOL = 0.05
SPU_RUN = [sys.executable, "-m", "mpcformer_jax.private.cli"]
WORDS = "a the film movie good bad great awful plot acting is was and but not very dull".split()


def _w(qid, rows, length, arrived=0.0):
    return Waiting(qid, rows, length, arrived)


# ------------------------------------------------------------------ the plan (no SPU)


def test_plan_waits_for_company_then_runs():
    buckets = [(1, 8), (8, 8), (4, 16)]
    assert plan_batch([], buckets, 0.0, 0.05) is None
    plan = plan_batch([_w("a", 1, 8, arrived=10.0)], buckets, 10.01, 0.05)
    assert plan.bucket == (1, 8) and not plan.run_now and plan.wait_s == pytest.approx(0.04)
    plan = plan_batch([_w("a", 1, 8, arrived=10.0)], buckets, 10.06, 0.05)
    assert plan.run_now and plan.qids == ("a",)
    # A query that waited out an execution waits the delay again once node 0 is free: the
    # clients just answered are about to send their next queries.
    plan = plan_batch([_w("a", 1, 8, arrived=10.0)], buckets, 40.01, 0.05, free_since=40.0)
    assert not plan.run_now and plan.wait_s == pytest.approx(0.04)
    full = [_w(str(k), 2, 8) for k in range(4)]  # 8 rows: the 8x8 bucket is full
    plan = plan_batch(full, buckets, 0.0, 10.0)
    assert plan.run_now and plan.bucket == (8, 8) and plan.rows == 8 and plan.padded_rows == 0


def test_plan_is_a_fifo_prefix_in_the_bucket_that_runs_most_rows():
    buckets = [(1, 8), (8, 8), (4, 16)]
    queue = [_w("short", 1, 8), _w("long", 1, 16), _w("short2", 1, 8)]
    plan = plan_batch(queue, buckets, 0.0, 10.0)
    assert plan.bucket == (4, 16) and plan.qids == ("short", "long", "short2")
    assert not plan.run_now  # 3 of 4 rows: it may still fill
    # The query after the prefix does not fit with it: waiting cannot help, run now, and
    # never run the later query first.
    queue = [_w("one", 1, 8), _w("four", 4, 8), _w("small", 1, 8)]
    plan = plan_batch(queue, [(1, 8), (4, 8), (4, 16)], 0.0, 10.0)
    assert plan.qids == ("one",) and plan.run_now and plan.bucket == (1, 8)
    plan = plan_batch(queue, [(1, 8), (8, 8)], 0.0, 10.0)
    assert plan.qids == ("one", "four", "small") and plan.bucket == (8, 8)


def test_plan_without_batching_is_todays_queue_and_refuses_a_misfit():
    buckets = [(1, 8), (8, 8)]
    plan = plan_batch([_w("a", 2, 8), _w("b", 1, 8)], buckets, 0.0, 10.0, batching=False)
    assert plan.qids == ("a",) and plan.bucket == (8, 8) and plan.run_now
    with pytest.raises(ValueError, match="fits no bucket"):
        plan_batch([_w("big", 9, 8)], buckets, 0.0, 0.0)


def test_stats_count_and_merge_across_generations():
    stats = Stats(window=3)
    for lat in (1.0, 2.0, 3.0, 4.0):
        stats.answer(lat)
    stats.batch(3, 1)
    stats.fail("ABORTED")
    snap = stats.snapshot()
    assert snap["answered"] == 4 and snap["latency_window"] == 3  # only the last 3 kept
    assert snap["latency_p50_s"] == 3.0 and snap["latency_p95_s"] == 4.0
    assert snap["mean_rows_per_batch"] == 3.0 and snap["failed"] == {"ABORTED": 1}
    merged = merge_stats(snap, {"answered": 1, "batches": 1, "rows": 1, "padded_rows": 0,
                                "failed": {"ABORTED": 2, "UNAVAILABLE": 1}})
    assert merged["answered"] == 5 and merged["failed"] == {"ABORTED": 3, "UNAVAILABLE": 1}
    assert merged["mean_rows_per_batch"] == 2.0 and merged["latency_p50_s"] is None


# ------------------------------------------------------------------ shares, joined locally


@pytest.mark.parametrize("protocol,parties", [("ABY3", 3), ("SEMI2K", 2), ("CHEETAH", 2)])
def test_joined_and_split_shares_reconstruct_the_batch(protocol, parties):
    import spu
    import spu.libspu as libspu

    rt = libspu.RuntimeConfig()
    rt.ParseFromJsonString(json.dumps({"protocol": protocol, "field": "FM64"}))
    io = spu.Io(parties, rt)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(1, 2, 5))  # 2 texts x 3, 1 x 2
    sa, sb = (io.make_shares(x.astype(np.float32), libspu.Visibility.VIS_SECRET)
              for x in (a, b))
    joined = [join_rows([sa[r], sb[r]], 4, 6) for r in range(parties)]
    assert shape_of(joined[0]) == (4, 6, 5)
    want = np.zeros((4, 6, 5))
    want[:2, :3], want[2:3, :2] = a, b  # zero where padded: positions and the 4th row
    assert np.abs(np.asarray(io.reconstruct(joined)) - want).max() < 1e-4
    pieces = [split_rows(s, [2, 1]) for s in joined]  # each party cuts its own share
    first = np.asarray(io.reconstruct([p[0] for p in pieces]))
    second = np.asarray(io.reconstruct([p[1] for p in pieces]))
    assert first.shape == (2, 6, 5) and second.shape == (1, 6, 5)
    assert np.abs(first[:, :3] - a).max() < 1e-4 and np.abs(second[:, :2] - b).max() < 1e-4
    with pytest.raises(ShareError, match="do not fit"):
        join_rows([sa[0], sb[0]], 2, 6)  # 3 rows into 2
    mask = io.make_shares(np.ones((1, 2), np.float32), libspu.Visibility.VIS_SECRET)
    with pytest.raises(ShareError, match="different kinds"):
        join_rows([sa[0], mask[0]], 4, 6)


# ------------------------------------------------------------------ a batching service


@pytest.fixture(scope="module")
def batched(tiny_student, tmp_path_factory):
    """ABY3, buckets 1x8, 8x8, 4x16; node 0 holds a lone query 1.5 s for company."""
    data = load_config("aby3_3pc").to_dict()
    data["service"] = {"max_queue": 16, "share_wait_s": 3, "max_batch_delay_ms": 1500}
    svc = Service(load_config(data), tiny_student, tmp_path_factory.mktemp("batched"),
                  "1x8,8x8,4x16")
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


def _together(state, texts_per_client):
    """Each client classifies its texts, all starting at once; returns the results."""
    results, errors = [None] * len(texts_per_client), []
    go = threading.Barrier(len(texts_per_client))

    def ask(k):
        try:
            with Client(state) as client:
                go.wait()
                results[k] = client.classify(texts_per_client[k])
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(texts_per_client))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


@pytest.mark.slow  # starts SPU node processes
def test_six_clients_in_one_execution_get_exactly_their_own_rows(batched, tiny_student):
    texts = [[f"{WORDS[k]} movie {WORDS[k + 6]}"] for k in range(5)] + [["dull", "fun plot"]]
    plains = [plaintext_logits(tiny_student, t, 8) for t in texts]
    for i in range(len(texts)):  # a swapped answer would show: every pair is told apart
        for j in range(i):
            assert np.abs(plains[i][0] - plains[j][0]).max() > 2 * TOL, (texts[i], texts[j])
    with Client(batched.state) as watcher:
        before = watcher.status()
    results = _together(batched.state, texts)
    executions = {r.queries[0]["execution"] for r in results}
    assert len(executions) == 1  # all six queries ran in one execution
    for k, result in enumerate(results):
        assert len(result.predictions) == len(texts[k])  # its rows, not the batch's 8
        private = np.array([p.logits for p in result.predictions])
        assert np.abs(private - plains[k]).max() < TOL
        assert [p.text for p in result.predictions] == texts[k]
        q = result.queries[0]
        assert q["bucket"] == "8x8" and q["rows_used"] == 7 and q["rows_padded"] == 1
        assert q["queries"] == 6 and q["rows"] == len(texts[k])
        assert q["share"] == pytest.approx(len(texts[k]) / 7, abs=1e-3)
        assert 0 < q["bytes"] < q["execution_bytes"] == result.cost.total.bytes
        assert q["rounds"] == pytest.approx(len(texts[k]) / 7 * q["execution_rounds"])
        assert q["wait_s"] >= 0 and q["run_s"] > 0 and q["latency_s"] >= q["run_s"]
    with Client(batched.state) as watcher:
        after = watcher.status()
    assert after["answered"] - before["answered"] == 6
    assert after["batches"] - before["batches"] == 1
    assert after["rows"] - before["rows"] == 7
    assert after["padded_rows"] - before["padded_rows"] == 1


@pytest.mark.slow  # starts SPU node processes
def test_short_query_padded_into_a_longer_bucket_answers_as_alone(batched, tiny_student):
    long = " ".join(["a very good film but not a great plot"] * 2)  # 20 tokens: 16 bucket
    short, other = _together(batched.state, [["a gripping film"], [long]])
    assert short.queries[0]["execution"] == other.queries[0]["execution"]
    assert short.queries[0]["bucket"] == "4x16"  # padded from 8 tokens to 16 by the nodes
    alone = plaintext_logits(tiny_student, ["a gripping film"], 8)
    private = np.array(short.predictions[0].logits)
    assert np.abs(private - alone[0]).max() < TOL
    assert short.predictions[0].label == f"LABEL_{alone[0].argmax()}"


@pytest.mark.slow  # starts SPU node processes
def test_a_client_closed_while_sending_gets_a_retriable_error(batched):
    """close() from another thread between opening the channels and sending on them (seen
    in the fault soak): a QueryError the caller can retry, not grpc's ValueError."""
    client = Client(batched.state)
    channels = client._nodes()
    client.close()
    client._nodes = lambda: channels  # the race: the call holds channels close() just closed
    with pytest.raises(QueryError, match="closed while the query was being sent") as err:
        client.classify(["a gripping film"])
    assert err.value.code == "CANCELLED"


@pytest.mark.slow  # starts SPU node processes
def test_a_client_gone_mid_query_does_not_disturb_its_batch(batched, tiny_student):
    """One client sends its shares to nodes 0 and 1 and dies before node 2's (the worst
    place to go); another cancels while queued. The rest of the batch is answered."""
    import spu

    from mpcformer_jax.private.runtime import make_shares, shares_to_blobs

    endpoint = read_endpoint(batched.state)
    client = Client(batched.state)
    io = spu.Io(3, client.cluster.runtime_config())
    shares = make_shares(io, {"a": np.zeros((1, 8, 100), np.float32),
                              "b": np.ones((1, 8), np.float32)})
    half_sent = []
    for rank in (0, 1):
        node = endpoint["nodes"][rank]
        counts, blobs = shares_to_blobs([shares["a"][rank], shares["b"][rank]])
        ch = transport.channel(node["io"], node["id"], client.ident)
        half_sent.append((ch, transport.stream_unary(ch, "Query").future(
            transport.stream_frames({"query_id": "ab" * 16, "rows": 1, "length": 8,
                                     "counts": counts, "fingerprint": endpoint["fingerprint"]},
                                    blobs), timeout=60)))
    before = client.status()
    cancelled = []

    def cancel_soon():  # a real client that gives up while queued
        other = Client(batched.state)
        call = threading.Thread(target=lambda: cancelled.append(
            _swallow(lambda: other.classify(["not very good"]))))
        call.start()
        time.sleep(0.5)
        other.close()  # closes its channels: the calls are cancelled
        call.join(60)

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    texts = [["great acting"], ["awful plot"], ["fun"]]
    results = _together(batched.state, texts)
    canceller.join(60)
    for k, result in enumerate(results):
        plain = plaintext_logits(tiny_student, texts[k], 8)
        assert np.abs(np.array([p.logits for p in result.predictions]) - plain).max() < TOL
    dropped = half_sent[0][1].exception(timeout=60)  # node 0 dropped it: retriable
    assert dropped.code().name == "ABORTED" and "send the query again" in dropped.details()
    for ch, call in half_sent:
        call.cancel()
        ch.close()
    after = client.status()
    assert after["answered"] - before["answered"] >= 3
    assert after["failed"].get("ABORTED", 0) - before["failed"].get("ABORTED", 0) == 1
    assert after["queue_depth"] == 0  # nothing left behind at node 0
    client.close()


def _swallow(fn):
    try:
        return fn()
    except Exception as err:
        return err


@pytest.mark.slow  # starts SPU node processes
def test_status_json_parses_and_counts(batched, tiny_student):
    with Client(batched.state) as client:
        before = client.status()
        client.classify(["a gripping film"])
        client.classify(["dull", "fun", "bad plot"])  # one query of 3 rows
    proc = subprocess.run(SPU_RUN + ["status", "--state-dir", str(batched.state), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    after = json.loads(proc.stdout)  # pure JSON on stdout
    assert after["ready"] and after["protocol"] == "ABY3" and after["restarts"] == 0
    assert after["answered"] - before["answered"] == 2
    assert after["batches"] - before["batches"] == 2 and after["rows"] - before["rows"] == 4
    assert after["uptime_s"] > before["uptime_s"] and after["queue_depth"] == 0
    assert after["latency_p50_s"] > 0 and after["latency_p95_s"] >= after["latency_p50_s"]
    digests = read_endpoint(batched.state)["program_digests"]
    for node in after["nodes"]:
        assert node["rss_bytes"] > 0 and node["threads"] > 0 and node["fds"] > 0
        assert node["program_digests"] == digests
    text = subprocess.run(SPU_RUN + ["status", "--state-dir", str(batched.state)],
                          capture_output=True, text=True, timeout=60).stdout
    assert text.startswith("ready") and "node2" in text and "latency p50" in text
    # Only aggregates: no text, logit or share in the status.
    assert "gripping" not in proc.stdout and "logits" not in proc.stdout
