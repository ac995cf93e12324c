"""One role per host, for real: every role in its own network namespace, joined by veth pairs.

Three nodes, the model owner (``spu_run serve --remote-nodes``) and a client each get a
namespace with one non-loopback address on a bridge; the deployment path of
``spu_configs/README.md`` runs as written: ``spu_run certs``, ``spu_run node`` per host with
fixed ports, the owner's upload, ``spu_run query``. A raw-socket capture on the bridge's ports
shows that every TCP connection between hosts is TLS from its first byte and that no
plaintext protocol marker crosses it; each node host listens on exactly its two TLS ports
(SPU's brpc server is on a Unix socket); a forged brpc Push from the client's host is
refused. The namespaces are removed afterwards, even when the test fails.

Needs root and iproute2 (present here and in CI); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import plaintext_logits

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 for network namespaces")]

CLI = [sys.executable, "-m", "mpcformer_jax.private.cli"]
TEXTS = ["a gripping film", "dull and boring plot"]
SUBNET = "10.77.{}.{}"
# Strings that appear in the clear only if a channel is not encrypted: gRPC's method path
# (HTTP/2 headers), SPU's brpc service name, our JSON headers, the client's words.
MARKERS = [b"mpcformer.Node", b"ReceiverService", b"fingerprint", b"query_id", b"gripping"]

CAPTURE = r'''
import socket, struct, sys, signal
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
# Unbound: every interface of the switch namespace, i.e. every veth port of the bridge
# (frames forwarded between ports never pass the bridge device itself).
sock.settimeout(0.5)
out = open(sys.argv[1], "wb")
running = [True]
signal.signal(signal.SIGTERM, lambda *a: running.__setitem__(0, False))
print("capturing", flush=True)
while running[0]:
    try:
        frame = sock.recv(65535)
    except socket.timeout:
        continue
    out.write(struct.pack("!I", len(frame)) + frame)
out.close()
'''


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Net:
    """Namespaces ``<tag>-<role>`` on a bridge in ``<tag>-sw``; ``close`` removes them all."""

    def __init__(self, tag: str, roles: list[str], octet: int):
        self.tag, self.roles, self.octet = tag, roles, octet
        self.made: list[str] = []
        self.addr = {r: SUBNET.format(octet, i + 1) for i, r in enumerate(roles)}

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def open(self) -> None:
        sw = self.ns("sw")
        sh("ip", "netns", "add", sw)
        self.made.append(sw)
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i, role in enumerate(self.roles):
            ns = self.ns(role)
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            a, b = f"{self.tag}a{i}", f"{self.tag}b{i}"
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", sw)
            sh("ip", "link", "set", b, "netns", ns)
            sh("ip", "-n", sw, "link", "set", a, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr[role]}/24", "dev", b)
            sh("ip", "-n", ns, "link", "set", b, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def run(self, role: str, args: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(role), *args], **kw)

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def tcp_payloads(path: Path):
    """(flow, payload) for every IPv4 TCP segment with data in a capture file."""
    data = path.read_bytes()
    i = 0
    while i + 4 <= len(data):
        (n,) = struct.unpack("!I", data[i:i + 4])
        frame = data[i + 4:i + 4 + n]
        i += 4 + n
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack("!H", frame[16:18])[0]
        tcp = frame[14 + ihl:14 + total]
        off = (tcp[12] >> 4) * 4
        payload = tcp[off:]
        if payload:
            src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
            sport, dport = struct.unpack("!HH", tcp[:4])
            yield (src, sport, dst, dport), payload


@pytest.fixture
def net():
    tag = f"mj{os.getpid() % 100000}"
    roles = ["node0", "node1", "node2", "owner", "client"]
    network = Net(tag, roles, 77)
    try:
        network.open()
    except subprocess.CalledProcessError as err:
        network.close()
        pytest.skip(f"network namespaces unavailable here: {err.stderr.decode().strip()}")
    try:
        yield network
    finally:
        network.close()
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        assert tag not in leftover.stdout


def test_one_role_per_host_encrypted_on_the_wire(net, tiny_student, tmp_path):
    nodes = ["node0", "node1", "node2"]
    config = {"protocol": "ABY3", "timeout_s": 60,
              "nodes": [{"id": n, "link": f"{net.addr[n]}:7201", "io": f"{net.addr[n]}:7101"}
                        for n in nodes],
              "link": {"connect_retry_times": 120, "connect_retry_interval_ms": 250}}
    cfg = tmp_path / "cluster.json"
    cfg.write_text(json.dumps(config))
    certs, state = tmp_path / "certs", tmp_path / "state"
    subprocess.run(CLI + ["certs", "--out", str(certs), "--config", str(cfg)], check=True,
                   capture_output=True, timeout=60)
    procs = []
    capture_file = tmp_path / "capture.bin"
    script = tmp_path / "capture.py"
    script.write_text(CAPTURE)
    capture = net.run("sw", [sys.executable, str(script), str(capture_file)],
                      stdout=subprocess.PIPE, text=True)
    procs.append(capture)
    try:
        assert capture.stdout.readline().strip() == "capturing"
        node_tmp = tmp_path / "node_tmp"  # where each node makes its private socket folder
        node_tmp.mkdir()
        for rank, n in enumerate(nodes):
            procs.append(net.run(n, CLI + ["node", "--rank", str(rank), "--config", str(cfg),
                                           "--certs", str(certs)],
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "TMPDIR": str(node_tmp)}))
        owner = net.run("owner", CLI + ["serve", "--config", str(cfg), "--model",
                                        str(tiny_student), "--state-dir", str(state),
                                        "--certs", str(certs), "--remote-nodes",
                                        "--buckets", "2x8"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(owner)
        line = owner.stdout.readline()
        assert line.startswith("ready"), owner.stderr.read() if owner.poll() else line
        query = net.run("client", CLI + ["query", "--state-dir", str(state), "--json"]
                        + [a for t in TEXTS for a in ("--text", t)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = query.communicate(timeout=180)
        assert query.returncode == 0, err
        doc = json.loads(out)
        private = np.array([r["logits"] for r in doc["results"]])
        assert np.max(np.abs(private - plaintext_logits(tiny_student, TEXTS, 8))) < 0.05
        capture.send_signal(signal.SIGTERM)  # what follows is an attacker's own plaintext
        capture.wait(10)

        # Each node host listens on exactly its two TLS ports: no brpc port on any network.
        for n in nodes:
            ss = subprocess.run(["ip", "netns", "exec", net.ns(n), "ss", "-Hltn"],
                                capture_output=True, text=True, check=True).stdout
            # gRPC listens on an IPv4-mapped IPv6 socket: [::ffff:10.77.77.1]:7101.
            ports = sorted(line.split()[3].replace("[::ffff:", "").replace("]", "")
                           for line in ss.splitlines())
            assert ports == sorted([f"{net.addr[n]}:7101", f"{net.addr[n]}:7201"]), ss
        # A forged brpc Push from the client's host reaches a TLS server, not the MPC.
        push = (b"POST /org.interconnection.link.ReceiverService/Push HTTP/1.1\r\nHost: x"
                b"\r\nContent-Length: 2\r\n\r\n{}")
        code = (f"import socket; s = socket.create_connection(({net.addr['node0']!r}, 7201), "
                f"timeout=5); s.sendall({push!r}); print(repr(s.recv(100)))")
        forged = subprocess.run(["ip", "netns", "exec", net.ns("client"), sys.executable, "-c",
                                 code], capture_output=True, text=True, timeout=30)
        assert "200 OK" not in forged.stdout and "HTTP/1.1" not in forged.stdout
        query2 = net.run("client", CLI + ["query", "--state-dir", str(state), "--json",
                                          "--text", TEXTS[0]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out2, err2 = query2.communicate(timeout=180)
        assert query2.returncode == 0, err2  # the nodes were not disturbed
        owner.send_signal(signal.SIGTERM)  # stops the remote nodes too
        assert owner.wait(60) == 0
        for p in procs[1:4]:
            assert p.wait(60) == 0, p.stderr.read()
        assert not list(node_tmp.iterdir())  # each node removed its folder on the way out
    finally:
        capture.send_signal(signal.SIGTERM)
        capture.wait(10)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    flows: dict[tuple, bytes] = {}
    seen = b""
    for flow, payload in tcp_payloads(capture_file):
        flows.setdefault(flow, payload)
        seen += payload
    # Traffic of every kind crossed the bridge: owner/client -> node io, node <-> node link.
    dports = {f[3] for f in flows}
    assert {7101, 7201} <= dports
    assert len(seen) > 1 << 20
    for flow, first in flows.items():
        assert first[:1] in (b"\x16", b"\x17", b"\x15", b"\x14"), (flow, first[:16])
        if flow[3] in (7101, 7201):  # a connection's opening bytes: a TLS ClientHello
            assert first[:3] in (b"\x16\x03\x01", b"\x16\x03\x03"), (flow, first[:16])
    for marker in MARKERS:
        assert marker not in seen, marker
