"""The emulated network of issue 18 (bench/netem.py, bench/relay.py, experiments/emulated.py):
every role on its own host, links with a one-way delay added in user space and a tbf rate.

Needs root and iproute2 (present here and in CI); skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from experiments.emulated import run_model, texts_for
from mpcformer_jax.bench.netem import Emulation, Link, leftover_namespaces

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 for network namespaces")]

def test_namespaces_and_processes_go_when_the_run_fails_midway():
    tag = f"nf{os.getpid() % 100000}"
    with pytest.raises(RuntimeError, match="midway"):
        with Emulation(["a", "b"], Link("t", 5.0, None), tag=tag) as net:
            assert sorted(leftover_namespaces(tag)) == sorted(
                [f"{tag}-sw", f"{tag}-a", f"{tag}-b"])
            sleeper = net.run("a", [sys.executable, "-c", "import time; time.sleep(600)"])
            raise RuntimeError("midway")
    assert leftover_namespaces(tag) == []
    assert sleeper.poll() is not None  # stopped with the emulation, not orphaned


def test_served_query_through_a_20ms_link_equals_plaintext(tiny_student):
    tag = f"ns{os.getpid() % 100000}"
    # As the experiment runs: the service starts on an unshaped link, then the link becomes
    # 20 ms / 100 Mbit/s with every connection (TLS tunnels, node links) kept.
    got = run_model(str(tiny_student), "tiny", "aby3_3pc", [Link("t20", 20.0, 100.0)],
                    ["2x8"], repeat=1, tag=tag, warmup=0, timeout_s=600)
    assert leftover_namespaces(tag) == []
    assert got["exit_codes"] == {"owner": 0, "node0": 0, "node1": 0, "node2": 0}, got
    (cell,) = got["cells"]
    cal = cell["calibration"][0]
    # The experiment's target is 1 ms on the median; CI's cores may be busier than a
    # measurement's, and busy cores only add to a trip: the fastest trip shows the delay.
    assert abs(cal["rtt_ms_min"] - 40.0) <= 2.0, cal
    assert abs(cal["rate_mbit"] / 100.0 - 1) <= 0.10, cal
    assert abs(cell["calibration"][1]["rtt_ms_min"] - 40.0) <= 2.0, cell["calibration"]
    (q,) = cell["buckets"]["2x8"]
    assert q["max_logit_gap"] < 0.05, q  # against the plaintext forward of the same texts
    # The delay was really on the MPC's path: every round waited at least one delay.
    assert q["rounds"] > 100
    assert q["latency_s"] >= q["rounds"] * 0.020, q


def test_reshaping_keeps_connections_and_changes_the_delay():
    tag = f"nr{os.getpid() % 100000}"
    with Emulation(["a", "b"], Link("none", 0.0, None), {"b": [7300]}, tag=tag) as net:
        assert net.calibrate("a", "b", pings=10, bulk=False)["rtt_ms_median"] < 2.0
        server = net.run("b", [sys.executable, "-m", "mpcformer_jax.bench.relay",
                               "probe-server", "--listen", f"{net.address('b')}:7300"],
                         stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        # One connection opened before the reshape, used after it.
        conn = subprocess.Popen(
            ["ip", "netns", "exec", net.ns("a"), sys.executable, "-c", PINGER,
             f"{net.address('b')}:7300"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        before = float(_ask(conn))
        net.shape(Link("t15", 15.0, 200.0))
        after = float(_ask(conn))
        conn.stdin.close()
        conn.wait(30)
        cal = net.calibrate("a", "b", pings=10)
    assert leftover_namespaces(tag) == []
    assert before < 2.0 and abs(after - 30.0) <= 2.0, (before, after)
    assert abs(cal["rtt_ms_min"] - 30.0) <= 2.0 and abs(cal["rate_mbit"] / 200 - 1) <= 0.1, cal


# Opens one connection to a probe server, then times one round trip per line on stdin.
PINGER = """
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"p")
for _ in sys.stdin:
    t = time.perf_counter(); s.sendall(b"x"); s.recv(1)
    print((time.perf_counter() - t) * 1000, flush=True)
"""


def _ask(proc) -> str:
    # The fastest of a few trips on the one open connection: the emulated delay is a floor
    # that no trip beats, and busy cores only ever add to a trip (a median of five read
    # 32.7 ms for a 30 ms link with a training run beside the suite).
    times = []
    for _ in range(5):
        proc.stdin.write("\n")
        proc.stdin.flush()
        times.append(float(proc.stdout.readline()))
    return str(min(times))


def test_texts_fill_their_bucket():
    texts = texts_for(8, 30, seed=1)
    assert len(texts) == 8 and len(set(texts)) == 8
    assert all(len(t.split()) == 30 for t in texts)
