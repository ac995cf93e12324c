"""The emulated network of issue 18 (bench/netem.py, bench/relay.py, experiments/emulated.py):
every role on its own host, links with a one-way delay added in user space and a tbf rate.

Needs root and iproute2 (present here and in CI); skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from conftest import plaintext_logits

from experiments.emulated import Deployment, texts_for
from mpcformer_jax.bench.netem import Emulation, Link, leftover_namespaces

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 for network namespaces")]

NODES = ["node0", "node1", "node2"]


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


def test_served_query_through_a_20ms_link_equals_plaintext(tiny_student, tmp_path):
    tag = f"ns{os.getpid() % 100000}"
    link = Link("t20", 20.0, 100.0)
    ports = {n: [7101, 7201] for n in NODES}
    with Emulation([*NODES, "owner", "client"], link, ports, tag=tag) as net:
        cal = net.calibrate("client", "node0")
        # The experiment's target is 1 ms; CI's cores may be busier than a measurement's.
        assert abs(cal["rtt_ms_median"] - 40.0) <= 2.0, cal
        assert abs(cal["rate_mbit"] / 100.0 - 1) <= 0.10, cal
        dep = Deployment(net, str(tiny_student), "aby3_3pc", "2x8", tmp_path)
        try:
            got = dep.query(2, 6, repeat=1)
        finally:
            codes = dep.stop()
    assert leftover_namespaces(tag) == []
    assert codes == {"owner": 0, "node0": 0, "node1": 0, "node2": 0}, codes  # clean stop
    for q in got["queries"]:
        private = np.array(q["logits"])
        assert private.shape == (2, 2)
        assert np.abs(private - plaintext_logits(tiny_student, q["texts"], 8)).max() < 0.05
        # The delay was really on the MPC's path: every round waited at least one delay.
        assert q["rounds"] > 100
        assert q["latency_s"] >= q["rounds"] * 0.020, q


def test_texts_fill_their_bucket():
    texts = texts_for(8, 30, seed=1)
    assert len(texts) == 8 and len(set(texts)) == 8
    assert all(len(t.split()) == 30 for t in texts)
