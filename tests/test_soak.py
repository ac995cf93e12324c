"""Long life and faults under load, on the tiny model (experiments/serve_soak.py does the
same on the default student): every request answered once, by its own rows; the nodes'
memory, threads and file descriptors flat over 500 queries; a node SIGKILLed under load
costs a retriable error and a restart, never a lost, doubled or misdelivered answer.
"""

from __future__ import annotations

import threading

import pytest

from experiments.serve_soak import (
    RETRIABLE,
    Request,
    make_requests,
    plaintext_answers,
    soak,
)
from mpcformer_jax.private import Service, load_config

TINY_WORDS = ("a the film movie good bad great awful plot acting is was and but not very "
              "dull gripping fun boring").split()
BUCKETS = "1x8,8x8,4x16"


def _service(model, state, buckets=BUCKETS, **service):
    # One executable per bucket (attribution "ops"): the soak counts answers, not op groups,
    # and the tiny model's cost is mostly per-executable overhead.
    data = load_config("aby3_3pc").to_dict()
    data["service"] = {"max_queue": 32, "share_wait_s": 5, **service}
    svc = Service(load_config(data), model, state, buckets, attribution="ops")
    svc.start()
    watcher = threading.Thread(target=svc.wait, daemon=True)  # restarts dead nodes
    watcher.start()
    return svc, watcher


def _requests(model, n, seed, max_rows, max_words=12):
    texts = make_requests(n, max_rows, max_words, seed, TINY_WORDS)
    expected = plaintext_answers(str(model), texts, [8, 16])
    return [Request(i, t, e) for i, (t, e) in enumerate(zip(texts, expected, strict=True))]


def _stop(svc, watcher):
    svc.request_stop()
    watcher.join(30)
    svc.stop()


def _clean(result):
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert result["misdelivered"] == 0 and not result["fatal_errors"], result
    assert set(result["retriable_errors"]) <= RETRIABLE


@pytest.mark.slow  # 500 queries through SPU node processes
def test_500_queries_in_one_lifetime_memory_flat(tiny_student, tmp_path):
    svc, watcher = _service(tiny_student, tmp_path / "state", "1x8,8x8,8x16")
    try:
        result = soak(str(svc.state), _requests(tiny_student, 500, 0, 2, 8), clients=8)
    finally:
        _stop(svc, watcher)
    _clean(result)
    assert result["answered"] == 500 and result["service"]["restarts"] == 0
    assert result["retriable_errors"] == {}  # nothing failed, nothing was retried
    assert result["service"]["mean_rows_per_batch"] > 2  # the clients' queries were batched
    for node, m in result["memory"].items():  # from query 50 to query 500
        assert m["pid_same"], node
        assert m["rss_growth"] <= 0.05, (node, m)
        assert len(m["threads_early_samples"]) == 6, (node, m)  # queries 50, 60, ..., 100
        assert len(m["threads_late_samples"]) == 6, (node, m)  # queries 450, 460, ..., 500
        assert m["threads"][1] <= m["threads"][0], (node, m)  # late low <= early peak
        assert m["fds"][1] <= m["fds"][0], (node, m)


@pytest.mark.slow  # SPU node processes, one killed and restarted
def test_short_soak_with_a_node_killed_and_a_client_gone(tiny_student, tmp_path):
    svc, watcher = _service(tiny_student, tmp_path / "state", max_batch_delay_ms=100)
    try:
        result = soak(str(svc.state), _requests(tiny_student, 60, 1, 3), clients=4,
                      kill_every_s=6, max_kills=1, disconnect_every=20)
    finally:
        _stop(svc, watcher)
    _clean(result)
    assert result["answered"] == 60
    assert len(result["kills"]) == 1 and result["service"]["restarts"] == 1
    assert result["kills"][0]["recovery_s"] is not None
    assert sum(result["retriable_errors"].values()) >= 1  # the kill and the leaving client


def test_thread_counts_compare_the_late_low_with_the_early_peak():
    """A node's thread count moves by a few with SPU's per-product threads and their parked
    OpenMP teams; the soak compares the smallest of its late samples with the largest of its
    early ones, and a count above that peak at every late sample (a leak) still shows."""
    import numpy as np

    from experiments.serve_soak import _account

    def figures(threads, fds=40, pid=7):
        return {"answered": 0, "nodes": {"node0": {
            "pid": pid, "rss_bytes": 100, "rss_settled_bytes": 100, "threads": threads,
            "fds": fds}}}

    req = Request(0, ["a film"], np.zeros((1, 2)))
    req.answers.append((np.zeros((1, 2)), ["q0"], [{"execution": 1}]))
    window = [figures(67), figures(69, 49), figures(68), figures(66, 41, pid=8)]
    status = {"answered": 1}

    def memory(end, late=()):
        samples = {"early": window[0], "early_window": window, "end": end,
                   "late_window": [figures(t) for t in late]}
        return _account([req], [], samples, status, 1.0, [])["memory"]["node0"]

    m = memory(figures(68))  # the end above the first sample, below the early peak
    assert m["threads"] == [69, 68] and m["fds"] == [49, 40]
    assert m["threads_early_samples"] == [67, 69, 68, 66]
    assert m["threads"][1] <= m["threads"][0]
    leak = memory(figures(70))  # above every early sample of that process (the 66 is not)
    assert leak["threads"] == [69, 70] and leak["threads"][1] > leak["threads"][0]
    # The late figure is the smallest late sample: one parked team at the end is no leak,
    # a count above the early peak at every late sample is.
    parked = memory(figures(70), late=(68, 69, 67))
    assert parked["threads"] == [69, 67] and parked["threads_late_samples"] == [68, 69, 67, 70]
    assert parked["threads"][1] <= parked["threads"][0]
    grown = memory(figures(72), late=(70, 71, 70))
    assert grown["threads"] == [69, 70] and grown["threads"][1] > grown["threads"][0]
