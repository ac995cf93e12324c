"""The private-inference service: answers, concurrency, refusals, faults, clean shutdown.

One ABY3 service of the tiny student (nodes as local processes, mutual TLS everywhere) is
shared by most tests; the fault tests start their own through ``spu_run serve``. Everything
that starts SPU processes is marked slow; the fast loop keeps the unit tests.
Tolerance as in test_private.py: |private - plaintext| < 0.05 (measured: about 1e-3).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import plaintext_logits

from mpcformer_jax.private import Client, QueryError, Service, load_config, transport
from mpcformer_jax.private.roles.client import read_endpoint
from mpcformer_jax.private.roles.owner import OwnerError, parse_buckets
from mpcformer_jax.private.service import ServiceError, preflight
from mpcformer_jax.private.tls import CertError, identity, make_certs

TOL = 0.05
TEXTS = ["a gripping film", "dull and boring plot", "great acting but bad plot", "fun"]
LONG = " ".join(["a very good film but not a great plot"] * 3)  # 31 tokens with CLS/SEP
SPU_RUN = [sys.executable, "-m", "mpcformer_jax.private.cli"]
BUCKETS = "1x8,4x8,4x16"


# ------------------------------------------------------------------ no service needed


def test_frames_round_trip_and_refuse_malformed():
    frame = transport.pack({"a": 1}, [b"xy", b"", b"z" * 5])
    header, blobs = transport.unpack(frame)
    assert header["a"] == 1 and blobs == [b"xy", b"", b"zzzzz"]
    for bad in (b"", frame[:-1], b"\xff\xff\xff\xff" + frame[4:], b"\x00\x00\x00\x02{]"):
        with pytest.raises(transport.FrameError):
            transport.unpack(bad)


def test_streams_are_checked_before_allocation():
    def stream(header, *chunks):
        return iter([json.dumps(header).encode(), *chunks])

    header, blobs = transport.receive_stream(stream({"sizes": [3, 2]}, b"abc", b"de"), 10)
    assert blobs == [b"abc", b"de"]
    with pytest.raises(transport.FrameError, match="more than the 10 allowed"):
        transport.receive_stream(stream({"sizes": [3 << 30]}), 10)  # refused, not allocated
    with pytest.raises(transport.FrameError, match="more bytes than it declared"):
        transport.receive_stream(stream({"sizes": [2]}, b"abc"), 10)
    with pytest.raises(transport.FrameError, match="ended after 1 of 2"):
        transport.receive_stream(stream({"sizes": [2]}, b"a"), 10)
    with pytest.raises(transport.FrameError, match="integer 'sizes'"):
        transport.receive_stream(stream({"sizes": [-1]}), 10)


def test_certificates_bind_roles(tmp_path):
    from mpcformer_jax.private.tls import subject_of

    make_certs(tmp_path / "c", ["n0", "n1"], clients=("alice",))
    assert subject_of((tmp_path / "c" / "n1.pem").read_bytes()) == ("node", "n1")
    assert subject_of((tmp_path / "c" / "alice.pem").read_bytes()) == ("client", "alice")
    assert subject_of((tmp_path / "c" / "owner.pem").read_bytes()) == ("owner", "owner")
    assert (tmp_path / "c" / "n0.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(CertError, match="already holds a CA"):
        make_certs(tmp_path / "c", ["n0"])
    with pytest.raises(CertError, match="no credentials for 'bob'"):
        identity(tmp_path / "c", "bob")


def test_buckets_parse_and_refuse():
    assert parse_buckets("8x32, 1x16,1x16") == [(1, 16), (8, 32)]
    for bad, message in (("8by32", "bad bucket"), ("0x16", "batch must be >= 1"), ("", "bad")):
        with pytest.raises(OwnerError, match=message):
            parse_buckets(bad)


def test_queries_take_the_fewest_buckets_that_fit():
    client = Client.__new__(Client)  # only the bucket plan: no service needed
    client.buckets, client.max_length = [(1, 64), (8, 16)], 64
    assert client._next_query([10] * 8) == (8, 16, 8)  # one query, not eight
    assert client._next_query([40] + [10] * 7) == (1, 64, 1)  # 8x16 cannot hold 40 tokens
    assert client._next_query([200]) == (1, 64, 1)  # longer than any bucket: truncated
    client.buckets, client.max_length = [(1, 16), (4, 16), (4, 32)], 32
    assert client._next_query([5, 5]) == (4, 16, 2)
    assert client._next_query([5, 20, 5]) == (4, 32, 3)
    assert client._next_query([5]) == (1, 16, 1)


def test_preflight_refuses_before_anything_starts(tiny_student, tmp_path):
    cluster = load_config("aby3_3pc")
    with pytest.raises(ServiceError, match="No checkpoint folder at .*none"):
        preflight(cluster, tmp_path / "none", BUCKETS, True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ServiceError, match="cannot read its config.json"):
        preflight(cluster, broken, BUCKETS, True)
    with pytest.raises(ServiceError, match="longer than the model's 64 positions"):
        preflight(cluster, tiny_student, "1x128", True)
    with pytest.raises(ServiceError, match=r"would need about .* GiB .* available"):
        preflight(cluster, tiny_student, "100000x64", True)  # the old `--batch-size 1000`


@pytest.mark.slow  # starts SPU node processes
def test_one_shot_fails_fast_on_bad_input(tiny_student, tmp_path):
    start = time.monotonic()
    proc = subprocess.run(SPU_RUN + ["--config", "aby3_3pc", "--model", str(tmp_path / "none"),
                                     "--text", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "spu_run: error: model" in proc.stderr
    assert "ready" not in proc.stderr  # no node was started
    proc = subprocess.run(SPU_RUN + ["--config", "aby3_3pc", "--model", str(tiny_student),
                                     "--input-file", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read --input-file" in proc.stderr
    proc = subprocess.run(SPU_RUN + ["--config", "aby3_3pc", "--model", str(tiny_student),
                                     "--text", "  "], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is empty" in proc.stderr
    assert time.monotonic() - start < 60  # seconds each, not the cluster's timeout


# ------------------------------------------------------------------ a running service


@pytest.fixture(scope="module")
def service(tiny_student, tmp_path_factory):
    state = tmp_path_factory.mktemp("serve")
    data = load_config("aby3_3pc").to_dict()
    data["service"] = {"max_queue": 4, "share_wait_s": 5}
    svc = Service(load_config(data), tiny_student, state, BUCKETS)
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()
        assert not (state / "endpoint.json").exists()


def _check(result, model, texts):
    bucket = result.buckets[0]
    plain = plaintext_logits(model, texts, int(bucket.split("x")[1]))
    private = np.array([p.logits for p in result.predictions])
    assert np.max(np.abs(private - plain)) < TOL
    assert [p.label for p in result.predictions] == [
        f"LABEL_{k}" for k in plain.argmax(-1)]
    assert [p.text for p in result.predictions] == list(texts)


@pytest.mark.slow  # starts SPU node processes
def test_sequential_queries_match_plaintext(service, tiny_student):
    with Client(service.state) as client:
        one = client.classify(TEXTS[:1])
        assert one.buckets == ["1x8"]  # the smallest bucket that holds it
        _check(one, tiny_student, TEXTS[:1])
        four = client.classify(TEXTS)
        assert four.buckets == ["4x8"]
        _check(four, tiny_student, TEXTS)
        long = client.classify([LONG, TEXTS[0]])
        assert long.buckets == ["4x16"]
        assert [p.truncated for p in long.predictions] == [True, False]
        assert long.predictions[0].tokens > 16
        _check(long, tiny_student, [LONG, TEXTS[0]])
    cost = four.cost
    assert cost.total.bytes > 0 and len(cost.per_party) == 3
    assert cost.groups["embedding"].bytes > 0 and cost.groups["linear"].bytes > 0
    assert 0 < cost.wall_s <= four.wall_s
    assert client.upload["bytes"] > 0  # the weight upload, reported once, apart
    assert cost.input_bytes["client"] < client.upload["bytes"]


@pytest.mark.slow  # starts SPU node processes
def test_concurrent_clients_get_their_own_answers(service, tiny_student):
    batches = [[TEXTS[k], TEXTS[(k + 1) % 4]] for k in range(4)]
    results, errors = [None] * 4, []

    def ask(k):
        try:
            with Client(service.state) as client:
                results[k] = [client.classify(batches[k]) for _ in range(2)]
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for k in range(4):
        for result in results[k]:
            _check(result, tiny_student, batches[k])


@pytest.mark.slow  # starts SPU node processes
def test_client_verifies_the_program_from_the_card(service):
    with Client(service.state) as client:
        digests = client.verify()
        assert digests == read_endpoint(service.state)["program_digests"]
        assert sorted(digests) == sorted(BUCKETS.split(","))
        assert all(node["ready"] for node in client.info())


@pytest.mark.slow  # starts SPU node processes
def test_certificates_are_made_and_demanded(service, tmp_path):
    certs = service.state / "certs"
    assert {"ca.pem", "owner.pem", "client.pem", "node0.pem"} <= {p.name for p in
                                                                  certs.iterdir()}
    node = read_endpoint(service.state)["nodes"][0]
    with grpc.insecure_channel(node["io"]) as ch:  # no TLS at all
        with pytest.raises(grpc.RpcError):
            transport.unary(ch, "Info")(b"{}", timeout=5)
    make_certs(tmp_path / "rogue", ["node0", "node1", "node2"])  # another CA, same names
    with pytest.raises(QueryError):
        with Client(service.state, certs=str(tmp_path / "rogue"), retries=0) as rogue:
            rogue.classify(TEXTS[:1])
    with Client(service.state) as client:  # still serving
        assert client.classify(TEXTS[:1]).predictions[0].label is not None


def _raw(address, data=b"", hold=False):
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    if data:
        try:
            sock.sendall(data)
            sock.recv(1024)
        except OSError:
            pass
    if not hold:
        sock.close()
    return sock


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow  # starts SPU node processes
def test_hostile_connections_are_refused_and_service_goes_on(service, tiny_student):
    endpoint = read_endpoint(service.state)
    cluster = endpoint["cluster"]
    with Client(service.state) as client:
        before = {n["node"]: n for n in client.info()}
    peaks = {name: _peak_rss(n["pid"]) for name, n in before.items()}
    silent = [_raw(n["io"], hold=True) for n in cluster["nodes"]]
    silent += [_raw(n["link"], hold=True) for n in cluster["nodes"]]
    for n in cluster["nodes"]:
        _raw(n["io"], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # HTTP garbage
        _raw(n["io"], b"\x00\x00\x00\xc0\x00\x00\x00\x00" * 4)  # a 3 GiB length prefix
        # SPU's brpc accepts a plain HTTP Push with any sender_rank on its own port; here the
        # node's link port is a TLS tunnel, and brpc itself listens on no network at all.
        push = (b"POST /org.interconnection.link.ReceiverService/Push HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n"
                b'{"sender_rank": 1, "trans_type": "MONO", "msg": {"key": "x"}}')
        _raw(n["link"], push)
    # A foreign-CA node certificate at the tunnel: refused in the handshake.
    rogue_dir = service.state.parent / "rogue_link"
    if not rogue_dir.exists():
        make_certs(rogue_dir, ["node0", "node1", "node2"])
    rogue = identity(rogue_dir, "node1")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(rogue.ca))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(rogue.cert, rogue.key)
    host, port = cluster["nodes"][0]["link"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with ctx.wrap_socket(raw, server_hostname="node0") as tls:
                tls.sendall(b"x")
                assert tls.recv(10) == b""  # closed without a byte (TLS 1.3 alerts late)
                raise OSError("closed")
    # A client certificate is not an owner's, and the declared sizes are checked first.
    ident = identity(service.state / "certs", "client")
    node = endpoint["nodes"][0]
    with transport.channel(node["io"], node["id"], ident) as ch:
        with pytest.raises(grpc.RpcError) as err:
            transport.stream_unary(ch, "Upload")(iter([b'{"sizes": [1]}', b"x"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        header = {"query_id": "0" * 32, "rows": 1, "length": 8, "counts": [1, 1],
                  "fingerprint": endpoint["fingerprint"], "sizes": [10, 3 << 30, 10, 10]}
        with pytest.raises(grpc.RpcError) as err:
            transport.stream_unary(ch, "Query")(iter([json.dumps(header).encode()]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must hold" in err.value.details()
        for shape, message in (((5, 8), "larger than any served bucket"),
                               ((1, 17), "longer than any served bucket")):
            big = {**header, "rows": shape[0], "length": shape[1]}
            with pytest.raises(grpc.RpcError) as err:
                transport.stream_unary(ch, "Query")(iter([json.dumps(big).encode()]),
                                                    timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()
        # Shares of the declared size but another shape: refused on arrival, so that they
        # can never break a batch with other clients' queries.
        import spu

        from mpcformer_jax.private.runtime import make_shares, shares_to_blobs

        io = spu.Io(3, load_config("aby3_3pc").runtime_config())
        wrong = make_shares(io, {"a": np.zeros((1, 100, 8), np.float32),
                                 "b": np.ones((1, 8), np.float32)})
        counts, blobs = shares_to_blobs([wrong["a"][0], wrong["b"][0]])
        with pytest.raises(grpc.RpcError) as err:
            transport.stream_unary(ch, "Query")(transport.stream_frames(
                {**header, "counts": counts}, blobs), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "was declared" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # one message above the cap
            transport.stream_unary(ch, "Query")(iter([b"x" * (transport.MAX_MESSAGE + 1)]),
                                                timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            transport.stream_unary(ch, "Query")(iter([json.dumps(
                {**header, "fingerprint": "another model", "sizes": []}).encode()]), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model changed" in err.value.details()
    with Client(service.state) as client:  # every node still serves, correctly
        _check(client.classify(TEXTS[:2]), tiny_student, TEXTS[:2])
        after = {n["node"]: n for n in client.info()}
    for s in silent:
        s.close()
    assert all(after[k]["pid"] == before[k]["pid"] for k in before)  # nobody restarted
    assert all(after[k]["tunnel_refusals"] > before[k]["tunnel_refusals"] for k in before)
    for name, n in after.items():
        assert _peak_rss(n["pid"]) - peaks[name] < 200 << 20  # no 3 GiB allocation


@pytest.mark.slow  # starts SPU node processes
def test_full_queue_is_refused_and_cancelled_queries_are_forgotten(service):
    """Queries sent to node 1 only wait there for node 0's order; the fifth is refused."""
    endpoint = read_endpoint(service.state)
    node = endpoint["nodes"][1]
    with Client(service.state) as client:
        import spu

        from mpcformer_jax.private.runtime import make_shares, shares_to_blobs

        io = spu.Io(3, client.cluster.runtime_config())
        shares = make_shares(io, {"a": np.zeros((1, 8, 100), np.float32),
                                  "b": np.ones((1, 8), np.float32)})
        counts, blobs = shares_to_blobs([shares["a"][1], shares["b"][1]])
        with transport.channel(node["io"], node["id"], client.ident) as ch:
            call = transport.stream_unary(ch, "Query")

            def query(k):
                return call.future(transport.stream_frames(
                    {"query_id": f"{k:032x}", "rows": 1, "length": 8, "counts": counts,
                     "fingerprint": endpoint["fingerprint"]}, blobs), timeout=60)

            waiting = [query(k) for k in range(4)]
            time.sleep(2)
            with pytest.raises(grpc.RpcError) as err:
                query(9).result()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in err.value.details()
            for w in waiting:
                w.cancel()
            time.sleep(1)
            again = query(10)  # room again after the cancellations: it waits, not refused
            time.sleep(1)
            assert not again.done()
            again.cancel()
        assert client.classify(TEXTS[:1]).predictions  # and node 0 still orders queries


# ------------------------------------------------------------------ spu_run serve / query


def _serve(model, state, tmp_path, *extra):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(SPU_RUN + ["serve", "--config", "aby3_3pc", "--model", str(model),
                                       "--state-dir", str(state), "--buckets", "1x8,2x8",
                                       *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {proc.stderr.read()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


@pytest.mark.slow
def test_serve_query_json_kill_restart_and_shutdown(tiny_student, tmp_path):
    state = tmp_path / "state"
    proc = _serve(tiny_student, state, tmp_path)
    try:
        query = subprocess.run(SPU_RUN + ["query", "--state-dir", str(state), "--json",
                                          "--text", TEXTS[0], "--text", TEXTS[1]],
                               capture_output=True, text=True, timeout=120)
        assert query.returncode == 0, query.stderr
        doc = json.loads(query.stdout)  # pure JSON: SPU's log lines went to stderr
        private = np.array([r["logits"] for r in doc["results"]])
        assert np.max(np.abs(private - plaintext_logits(tiny_student, TEXTS[:2], 8))) < TOL
        assert doc["buckets"] == ["2x8"] and doc["cost"]["total"]["bytes"] > 0

        with Client(state, retries=0) as client:
            nodes = {n["node"]: n["pid"] for n in client.info()}
            stop, outcomes = threading.Event(), []

            def hammer():
                while not stop.is_set():
                    try:
                        client.classify(TEXTS[:1])
                        outcomes.append("ok")
                    except QueryError as err:
                        outcomes.append(err)

            worker = threading.Thread(target=hammer)
            worker.start()
            time.sleep(2)
            os.kill(nodes["node1"], signal.SIGKILL)
            killed = time.monotonic()
            while not any(isinstance(o, QueryError) for o in outcomes):
                assert time.monotonic() - killed < 30, "no error after a node died"
                time.sleep(0.05)
            noticed = time.monotonic() - killed
            stop.set()
            worker.join(60)
        error = next(o for o in outcomes if isinstance(o, QueryError))
        assert error.code == "UNAVAILABLE" and "retry" in str(error)
        assert noticed < 15  # seconds, not the config's timeout_s (300 s)
        deadline = time.monotonic() + 120
        while read_endpoint(state).get("generation", 0) < 2 or not read_endpoint(
                state).get("ready"):
            assert time.monotonic() < deadline, "the service did not restart its nodes"
            time.sleep(0.5)
        with Client(state) as client:  # answered again, by fresh nodes
            _check(client.classify(TEXTS[:2]), tiny_student, TEXTS[:2])
            new = {n["node"]: n["pid"] for n in client.info()}
        assert not set(new.values()) & set(nodes.values())
        assert not any(_alive(pid) for pid in nodes.values())  # the old ones are all gone
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "restarting the nodes" in err and "stopped" in err
    assert not any(_alive(pid) for pid in new.values())
    assert not list(tmp_path.glob("spu_*"))  # no node folder (sockets, logs) left behind
    assert not (state / "endpoint.json").exists()


@pytest.mark.slow
def test_one_shot_json_is_pure_and_matches_plaintext(tiny_student, tmp_path):
    proc = subprocess.run(SPU_RUN + ["--config", "semi2k_2pc", "--model", str(tiny_student),
                                     "--batch-size", "2", "--max-length", "8", "--json"]
                          + [a for t in TEXTS[:3] for a in ("--text", t)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    private = np.array([r["logits"] for r in doc["results"]])
    assert np.max(np.abs(private - plaintext_logits(tiny_student, TEXTS[:3], 8))) < TOL
    assert doc["buckets"] == ["2x8", "2x8"] and doc["upload"]["bytes"] > 0
    assert not list(tmp_path.glob("spu_*"))


@pytest.mark.slow
def test_cheetah_service_matches_plaintext_after_a_chosen_port_is_taken(tiny_student, tmp_path,
                                                                       capfd):
    """Ports 0 are chosen at launch; another process takes one before node1 listens on it.
    node1 exits with EXIT_PORT_IN_USE at once, the upload stops waiting, and the service
    starts again on new ports: the caller sees a served model, not a failure minutes later."""
    svc = Service(load_config("cheetah_2pc"), tiny_student, tmp_path / "state", "2x8")
    taken = svc.cluster.nodes[1].link
    squatter = socket.create_server(taken)
    start = time.monotonic()
    try:
        svc.start()
        assert time.monotonic() - start < 120  # not the cluster's 180 s upload timeout
        assert svc.cluster.nodes[1].link != taken and svc.requested.needs_ports
        assert "node node1 found a port chosen for it taken" in capfd.readouterr().err
        with Client(tmp_path / "state") as client:
            _check(client.classify(TEXTS[:2]), tiny_student, TEXTS[:2])
    finally:
        squatter.close()
        svc.stop()


def test_ports_chosen_at_launch_are_free_distinct_and_outside_the_ephemeral_range():
    from mpcformer_jax.private.launcher import PortInUse, check_port_free, resolve_ports

    cluster = resolve_ports(load_config("aby3_3pc"))
    ports = [p for n in cluster.nodes for p in (n.link[1], n.io[1])]
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert len(set(ports)) == len(ports) and all(20000 <= p < low for p in ports)
    with socket.create_server(("127.0.0.1", ports[0])):
        with pytest.raises(PortInUse, match=f"127.0.0.1:{ports[0]} is already in use"):
            check_port_free("127.0.0.1", ports[0], "node0 link")


@pytest.mark.slow
def test_remote_nodes_lost_one_stops_all_in_seconds(tiny_student, tmp_path):
    """Nodes started on their own (`spu_run node`, fixed ports); the owner serves them. When
    one dies, the owner stops with one line naming it and the others exit: no orphans."""
    from mpcformer_jax.private.launcher import free_port

    data = load_config("aby3_3pc").to_dict()
    for node in data["nodes"]:
        node["link"] = f"127.0.0.1:{free_port('127.0.0.1')}"
        node["io"] = f"127.0.0.1:{free_port('127.0.0.1')}"
    cfg = tmp_path / "cluster.json"
    cfg.write_text(json.dumps(data))
    certs = tmp_path / "certs"
    subprocess.run(SPU_RUN + ["certs", "--out", str(certs), "--config", str(cfg)], check=True,
                   capture_output=True, timeout=60)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    nodes = [subprocess.Popen(SPU_RUN + ["node", "--rank", str(r), "--config", str(cfg),
                                         "--certs", str(certs)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in range(3)]
    svc = Service(load_config(cfg), tiny_student, tmp_path / "state", "1x8", certs=certs,
                  remote_nodes=True)
    try:
        svc.start()
        with Client(tmp_path / "state") as client:
            _check(client.classify(TEXTS[:1]), tiny_student, TEXTS[:1])
        nodes[2].kill()
        killed = time.monotonic()
        with pytest.raises(ServiceError, match="node node2 at 127.0.0.1:.* is unreachable"):
            svc.wait()
        assert time.monotonic() - killed < 20
    finally:
        svc.stop()
        for p in nodes:
            try:
                p.wait(30)
            finally:
                if p.poll() is None:
                    p.kill()
    for p in nodes[:2]:  # stopped by the owner, or by SPU's link: either way one clear line
        err = p.stderr.read()
        assert p.returncode in (0, 2), err
        if p.returncode == 2:
            assert "spu_run node: error: node node" in err and "Traceback" not in err
    assert len(list(tmp_path.glob("spu_*"))) <= 1  # only the killed node's folder is left


@pytest.mark.slow
def test_research_api_processes_backend_runs_through_a_service(tiny_student):
    from mpcformer_jax.private import run

    result = run(str(tiny_student), TEXTS[:2], protocol="SEMI2K", max_length=8,
                 backend="processes")
    assert result.max_abs_diff < TOL and result.label_agreement == 1.0
    report = result.report
    assert len(report.per_party) == 2 and report.total.bytes > 0
    assert report.input_bytes["owner"] > report.input_bytes["client"] > 0


@pytest.mark.slow  # starts SPU node processes
def test_public_table_model_is_served_and_verified(service, tiny_student, tmp_path):
    """A student whose word table is a public checkpoint's: the owner shares no table, the
    card names it, the client checks its hash, looks up, and the answers match plaintext."""
    from mpcformer_jax.models import load_pretrained, save_pretrained
    from mpcformer_jax.models.public_table import mark_public, word_table

    config, params, tokenizer = load_pretrained(tiny_student)
    source = save_pretrained(tmp_path / "source", config, params)
    config = mark_public(config, params, str(source), word_table(params))
    model = save_pretrained(tmp_path / "student", config, params, tokenizer)
    svc = Service(load_config("aby3_3pc"), model, tmp_path / "state", "2x8")
    try:
        svc.start()
        card = json.loads((svc.state / "card" / "private_config.json").read_text())
        assert card["public_table"]["sha256"] == config.public_table_sha256
        with Client(svc.state) as client:
            assert client.table is not None and client.config.folded
            client.verify()  # the card's prepared config compiles to the nodes' program
            result = client.classify(TEXTS[:2])
            _check(result, model, TEXTS[:2])
            upload = client.upload["bytes"]
        with Client(service.state) as one_hot_client:  # the same student, table private
            assert upload < one_hot_client.upload["bytes"]
    finally:
        svc.stop()


@pytest.mark.slow  # starts SPU node processes
def test_semi2k_service_opens_the_weights_once_and_answers_every_query(tiny_student, tmp_path):
    """SEMI2K's Beaver cache (LOWERING: beaver_cache_weights): the nodes hold the weights'
    opened masks after the first query of a bucket; every later query, in any bucket, still
    equals plaintext, and sends fewer bytes than the first."""
    data = load_config("semi2k_2pc").to_dict()
    data["service"] = {"max_queue": 4, "share_wait_s": 5}
    caches_before = set(Path.cwd().glob("BeaverCache.*"))
    svc = Service(load_config(data), tiny_student, tmp_path / "state", "1x8,4x8")
    try:
        svc.start()
        with Client(svc.state) as client:
            first = client.classify(TEXTS[:1])
            _check(first, tiny_student, TEXTS[:1])
            again = client.classify(TEXTS[1:2])
            _check(again, tiny_student, TEXTS[1:2])
            four = client.classify(TEXTS)  # another program, the same weights' cache
            _check(four, tiny_student, TEXTS)
            once_more = client.classify(TEXTS[2:3])
            _check(once_more, tiny_student, TEXTS[2:3])
    finally:
        svc.stop()
    linear = [r.cost.groups["linear"].bytes for r in (first, again, once_more)]
    assert linear[1] == linear[2] < 0.8 * linear[0]
    # The nodes kept their Beaver cache (opened masks, on disk) in their private folders.
    assert set(Path.cwd().glob("BeaverCache.*")) == caches_before
