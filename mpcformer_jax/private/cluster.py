"""The three roles of a private-inference cluster, each a plain function run in its own process.

* node (one per rank): listens for the owner's and the client's shares, joins the other nodes
  over SPU's brpc link and runs the compiled segments; it returns only its *share* of the
  logits, to the client. It sees shares only, never weights or text.
* owner: the only role that reads the weights; compiles the forward for the agreed batch shape,
  secret-shares the weights and sends each node its share and the executables.
* client: the only role that reads the text; tokenizes and one-hot encodes it locally, shares
  it, and reconstructs the logits from the nodes' output shares (spu.Io): only it sees them.

Every wait is bounded by the config's ``timeout_s`` (brpc's ``recv_timeout_ms`` too), so a
node that dies makes the others fail with an error instead of hanging.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import select
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import spu
import spu.libspu as libspu

from mpcformer_jax.private.config import ClusterConfig
from mpcformer_jax.private.cost import (
    CostReport,
    PartyTraffic,
    Traffic,
    fill_report,
    parse_profile,
)
from mpcformer_jax.private.program import CompiledForward
from mpcformer_jax.private.simulate import make_shares, run_segments, setup_spu_log, share_bytes
from mpcformer_jax.private.wire import (
    WireError,
    accept,
    blobs_to_shares,
    check_port_free,
    connect,
    listen,
    shares_to_blobs,
)


def fingerprint(model_config) -> str:
    """A hash of the model's architecture; owner and client must agree on it."""
    text = json.dumps(dataclasses.asdict(model_config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- node


def node_main(cluster: ClusterConfig, rank: int, key: bytes) -> None:
    """Runs compute node ``rank`` until the client says it is done."""
    node, timeout = cluster.nodes[rank], cluster.timeout_s
    what = f"node {rank} ({node.id})"
    server = listen(*node.io, f"{what} share I/O")
    check_port_free(*node.link, f"{what} MPC link")
    # The profile log lives here; the pid in the name lets an operator (or a test) find us.
    tmp = Path(tempfile.mkdtemp(prefix=f"spu_node{rank}_{os.getpid()}_"))
    setup_spu_log(tmp / "link.log")
    try:
        lctx = libspu.link.create_brpc(cluster.link_desc(), rank)
    except Exception as err:
        addrs = [n.link_addr for n in cluster.nodes]
        raise WireError(f"{what}: could not connect to the other nodes {addrs} within the "
                        f"retry budget of the config's link section: {err}") from None
    # The runtime's protocol setup is a collective among the nodes: do it before serving the
    # owner and the client. Done later, a node busy receiving a large model share would hold
    # the others in that collective while they wait for the owner, who is still sending to
    # it: a deadlock that small test models (whose shares fit in socket buffers) never show.
    rt = spu.Runtime(lctx, cluster.runtime_config())
    peers = {}
    try:
        while len(peers) < 2:
            ch = accept(server, key, timeout, f"{what} waiting for the owner and the client")
            _, meta, _ = ch.recv(timeout, "hello")
            role = meta.get("role")
            if role not in ("owner", "client") or role in peers:
                ch.send("error", {"message": f"unexpected role {role!r}"})
                raise WireError(f"{what}: unexpected connection claiming role {role!r}")
            ch.peer = role
            peers[role] = ch
        server.close()
        _serve(cluster, rank, rt, peers["owner"], peers["client"], tmp)
    except Exception as err:
        for ch in peers.values():  # tell the others why, so they fail fast with a reason
            try:
                ch.send("error", {"message": f"{what}: {err}"})
            except Exception:
                pass
        raise
    finally:
        for ch in peers.values():
            ch.close()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    lctx.stop_link()


def _serve(cluster, rank, rt, owner, client, tmp: Path) -> None:
    timeout = cluster.timeout_s
    _, meta, blobs = owner.recv(timeout, "model")
    n_seg = len(meta["program"]["segments"])
    compiled = CompiledForward.from_wire(meta["program"], blobs[:n_seg])
    for name, share in zip(compiled.param_names, blobs_to_shares(meta["counts"], blobs[n_seg:]),
                           strict=True):
        rt.set_var(name, share)
    owner_bytes = sum(len(b) for b in blobs[n_seg:])
    owner.send("ack")
    owner.close()
    executables = [seg.load() for seg in compiled.segments]
    for index in range(1 << 30):
        kind, cmeta, blobs = client.recv(timeout)
        if kind == "done":
            return
        if cmeta.get("fingerprint") != meta["fingerprint"]:
            raise WireError("the client's model card does not match the owner's model "
                            f"(fingerprint {cmeta.get('fingerprint')} vs {meta['fingerprint']})")
        shapes = [tuple(s) for s in cmeta["shapes"]]
        if shapes != list(compiled.input_shapes):
            raise WireError(f"the client sends inputs of shapes {shapes} but the owner compiled "
                            f"{list(compiled.input_shapes)}: start both with the same "
                            "--batch-size and --max-length")
        for name, share in zip(compiled.input_names, blobs_to_shares(cmeta["counts"], blobs),
                               strict=True):
            rt.set_var(name, share)
        log = tmp / f"batch{index}.log"
        setup_spu_log(log)
        start = time.perf_counter()
        try:
            run_segments(rt, compiled, executables)
        except RuntimeError as err:  # SPU raises on a brpc timeout or a lost peer
            raise WireError(f"the MPC run failed (is another node down?): {err}") from None
        wall = time.perf_counter() - start
        out = rt.get_var(compiled.output_name)
        setup_spu_log(tmp / "idle.log")  # flushes the batch's profile
        by_exe, links, _ = parse_profile(log.read_text())
        profile = {"wall_s": wall, "compile_s": compiled.compile_s, "owner_bytes": owner_bytes,
                   "by_exe": {e: {op: [t.bytes, t.messages, t.time_s] for op, t in ops.items()}
                              for e, ops in by_exe.items()},
                   "link": [sum(getattr(li, f) for li in links)
                            for f in ("send_bytes", "recv_bytes", "send_messages",
                                      "recv_messages")]}
        counts, out_blobs = shares_to_blobs([out])
        client.send("result", {"index": index, "counts": counts, "profile": profile}, out_blobs)


# --------------------------------------------------------------------------- owner


def owner_send(cluster: ClusterConfig, compiled: CompiledForward, params: dict[str, np.ndarray],
               model_fingerprint: str, key: bytes) -> int:
    """Shares the weights and sends each node its share and the program; returns bytes sent."""
    io = spu.Io(cluster.world_size, cluster.runtime_config())
    shares = make_shares(io, {n: params[n] for n in compiled.param_names})
    program, exe_blobs = compiled.to_wire()
    channels, sent = [], 0
    try:
        for rank, node in enumerate(cluster.nodes):
            ch = connect(*node.io, key, f"node {rank} ({node.id})", cluster.timeout_s)
            channels.append(ch)
            ch.send("hello", {"role": "owner"})
            counts, blobs = shares_to_blobs([shares[n][rank] for n in compiled.param_names])
            sent += ch.send("model", {"program": program, "counts": counts,
                                      "fingerprint": model_fingerprint}, exe_blobs + blobs)
        for ch in channels:
            ch.recv(cluster.timeout_s, "ack")
    finally:
        for ch in channels:
            ch.close()
    return sent


# --------------------------------------------------------------------------- client


class ClientSession:
    """The client's connections to all nodes; sends input shares, reconstructs logits."""

    def __init__(self, cluster: ClusterConfig, key: bytes):
        self.cluster = cluster
        self.io = spu.Io(cluster.world_size, cluster.runtime_config())
        self.channels = []
        for rank, node in enumerate(cluster.nodes):
            ch = connect(*node.io, key, f"node {rank} ({node.id})", cluster.timeout_s)
            self.channels.append(ch)
            ch.send("hello", {"role": "client"})
        self.profiles: list[list[dict]] = []  # per batch, per rank
        self.input_bytes = 0

    def infer(self, input_names, arrays, model_fingerprint: str) -> np.ndarray:
        """Runs one batch privately; only this process ever holds the revealed logits."""
        shares = make_shares(self.io, dict(zip(input_names, arrays, strict=True)))
        for rank, ch in enumerate(self.channels):
            own = [shares[n][rank] for n in input_names]
            self.input_bytes += share_bytes(own)
            counts, blobs = shares_to_blobs(own)
            ch.send("batch", {"fingerprint": model_fingerprint, "counts": counts,
                              "shapes": [list(np.shape(a)) for a in arrays]}, blobs)
        # Wait on all nodes at once, so one that dies is noticed at once, not after the others.
        results: dict[int, tuple[dict, list[bytes]]] = {}
        deadline = time.monotonic() + self.cluster.timeout_s
        while len(results) < len(self.channels):
            pending = {ch.sock: r for r, ch in enumerate(self.channels) if r not in results}
            ready, _, _ = select.select(list(pending), [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                names = [self.channels[r].peer for r in pending.values()]
                raise WireError(f"timed out waiting for the results of {names}")
            for sock in ready:
                rank = pending[sock]
                _, meta, blobs = self.channels[rank].recv(self.cluster.timeout_s, "result")
                results[rank] = meta, blobs
        outs = [s for r in range(len(self.channels))
                for s in blobs_to_shares(results[r][0]["counts"], results[r][1])]
        self.profiles.append([results[r][0]["profile"] for r in range(len(self.channels))])
        return np.asarray(self.io.reconstruct(outs))

    def close(self, ok: bool = True) -> None:
        for ch in self.channels:
            try:
                if ok:
                    ch.send("done")
            except WireError:
                pass
            ch.close()

    def report(self) -> CostReport:
        """Cost report over all batches, with exact per-rank link totals."""
        report = CostReport(self.cluster.protocol, self.cluster.world_size)
        report.per_party = [PartyTraffic() for _ in self.cluster.nodes]
        by_exe: dict[str, dict[str, Traffic]] = {}
        for batch in self.profiles:
            report.wall_s += max(p["wall_s"] for p in batch)
            for rank, prof in enumerate(batch):
                party = report.per_party[rank]
                sb, rb, sm, rm = prof["link"]
                party.send_bytes += sb
                party.recv_bytes += rb
                party.send_messages += sm
                party.recv_messages += rm
                for exe, ops in prof["by_exe"].items():
                    for op, (b, m, t) in ops.items():
                        by_exe.setdefault(exe, {}).setdefault(op, Traffic()).add(Traffic(b, m, t))
        fill_report(report, by_exe, self.cluster.world_size)
        report.total = Traffic(sum(p.send_bytes for p in report.per_party),
                               sum(p.send_messages for p in report.per_party),
                               report.total.time_s)
        report.input_bytes = {"owner": sum(p["owner_bytes"] for p in self.profiles[0]),
                              "client": self.input_bytes}
        report.compile_s = self.profiles[0][0]["compile_s"]  # done by the owner
        return report
