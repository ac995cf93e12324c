"""A compute node: holds weight shares and executables, answers queries until stopped.

A node sees shares only. Its life:

1. open its gRPC service (mutual TLS; callers are known by certificate) and its tunnels to the
   other nodes (tunnel.py), join them over SPU's brpc link and create the SPU runtime (a
   collective among the nodes, done before serving: see ``_connect``);
2. accept one upload from the *owner*: the executables of every (batch, length) bucket and
   this node's share of every weight;
3. answer *client* queries. Every node must run the same query at the same time, so node 0
   orders them: it takes queries in the order their shares reached it, asks every other node
   whether it holds that query's shares too (``Prepare``, waiting up to ``share_wait_s``),
   then tells them to run it (``Commit``) or to drop it, and runs it itself. A node returns
   only its share of the logits, to the client that asked, on the call that asked.

Only the MPC thread (the process's main thread) touches the SPU runtime; gRPC handlers hand
it work through a queue. If an MPC run fails (a peer died), the node answers the query with
an error and exits: the brpc link cannot be trusted afterwards, and the service restarts the
nodes (service.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import spu
import spu.libspu as libspu

from mpcformer_jax.private import transport
from mpcformer_jax.private.config import ClusterConfig
from mpcformer_jax.private.program import CompiledForward, program_digest
from mpcformer_jax.private.runtime import (
    CHUNK_OVERHEAD,
    blobs_to_shares,
    bytes_per_element,
    mem_available,
    profile_of,
    run_segments,
    setup_spu_log,
    shares_to_blobs,
)
from mpcformer_jax.private.tls import Identity
from mpcformer_jax.private.tunnel import Tunnels

_QID = re.compile(r"[0-9a-f]{32}")
_MAX_META = 4096  # bytes of one share's metadata (shape, type); the data is counted exactly
_MIN_CHUNK = 1 << 16  # a share arrives in few chunks; this bounds how many a caller may claim
_SHUTDOWN_GRACE_S = 5.0


class NodeFailure(RuntimeError):
    """The node cannot go on (its MPC link failed); the process exits non-zero."""


@dataclasses.dataclass
class Query:
    """One client query as this node holds it."""

    qid: str
    bucket: str
    shares: list
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    response: bytes | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    state: str = "waiting"  # waiting -> prepared -> running -> done; or dropped

    def finish(self, response: bytes | None = None, error=None) -> None:
        self.response, self.error, self.state = response, error, "done"
        self.shares = []
        self.done.set()


@dataclasses.dataclass
class Model:
    """What the owner uploaded: fingerprint, per-bucket programs, expected input sizes."""

    fingerprint: str
    programs: dict[str, CompiledForward]
    executables: dict[str, list]
    input_bytes: dict[str, list[int]]  # bucket -> exact data bytes of each input share
    digests: dict[str, str]
    owner_bytes: int


class Node:
    """Node ``rank`` of ``cluster``; ``workdir`` is a private folder for sockets and logs."""

    def __init__(self, cluster: ClusterConfig, rank: int, ident: Identity, workdir: Path,
                 plain_link: bool = False):
        self.cluster, self.rank, self.ident, self.dir = cluster, rank, ident, Path(workdir)
        self.plain_link = plain_link
        self.name = cluster.nodes[rank].id
        self.ids = [n.id for n in cluster.nodes]
        self.leader = rank == 0
        self.work: queue.Queue = queue.Queue()
        self.queries: dict[str, Query] = {}
        self.lock = threading.Condition()
        self.model: Model | None = None
        self.stopping = threading.Event()
        # Known before the service opens: an upload may arrive while the link still forms.
        self.per_elem = bytes_per_element(cluster.runtime_config(), len(self.ids))
        self.server = None
        self.tunnels = None
        self.lctx = None
        self.rt = None
        self._peers = {}
        self.served = 0
        self.receiving = 0  # query streams being read (they count against max_queue)

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Opens the service and the tunnels, joins the other nodes, creates the runtime."""
        handlers = {
            "Upload": grpc.stream_unary_rpc_method_handler(self._upload),
            "Query": grpc.stream_unary_rpc_method_handler(self._query),
            "Prepare": grpc.unary_unary_rpc_method_handler(self._prepare),
            "Commit": grpc.unary_unary_rpc_method_handler(self._commit),
            "Info": grpc.unary_unary_rpc_method_handler(self._info),
            "Shutdown": grpc.unary_unary_rpc_method_handler(self._shutdown),
        }
        limit = self.cluster.max_queue + 8  # queries waiting + owner + node 0's calls
        host, port = self.cluster.nodes[self.rank].io
        self.server = transport.server(f"{host}:{port}", self.ident, handlers,
                                       max_workers=limit, max_concurrent=limit)
        self.tunnels = Tunnels(self.ident, self.ids, self.rank,
                               [n.link for n in self.cluster.nodes], self.dir)
        if self.plain_link:  # benchmarks only: brpc in the clear on the config's link ports
            addrs = [n.link_addr for n in self.cluster.nodes]
        else:
            self.tunnels.start()
            addrs = [self.tunnels.brpc_self if j == self.rank else self.tunnels.brpc_peer(j)
                     for j in range(len(self.ids))]
        self._connect(addrs)

    def _connect(self, addrs: list[str]) -> None:
        try:
            self.lctx = libspu.link.create_brpc(self.cluster.link_desc(addrs), self.rank)
        except Exception as err:
            raise NodeFailure(f"node {self.name}: could not join the other nodes "
                              f"{[n.link_addr for n in self.cluster.nodes]} within the link "
                              f"retry budget: {err}") from None
        # The runtime's setup is a collective among the nodes: do it before serving, or a node
        # busy receiving a large upload would hold the others in it (a deadlock).
        self.rt = spu.Runtime(self.lctx, self.cluster.runtime_config())

    def stop(self) -> None:
        """Fails whatever is queued, closes every channel and listener."""
        self.stopping.set()
        with self.lock:
            for q in self.queries.values():
                if q.state != "done":
                    q.finish(error=(grpc.StatusCode.UNAVAILABLE,
                                    f"node {self.name} is shutting down; retry"))
            self.lock.notify_all()
        if self.server is not None:
            self.server.stop(grace=1).wait(2)
        for ch in self._peers.values():
            ch.close()
        if self.lctx is not None:
            try:
                self.lctx.stop_link()
            except Exception:
                pass
        if self.tunnels is not None:
            self.tunnels.close()

    # ------------------------------------------------------------------ gRPC handlers

    def _require(self, context, *roles: str, name: str | None = None) -> tuple[str, str]:
        role, who = transport.peer_identity(context)
        if role not in roles or (name is not None and who != name):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"certificate {role or '?'}/{who or '?'} may not call this")
        return role, who

    def _upload(self, request_iterator, context) -> bytes:
        self._require(context, "owner")
        if self.model is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {self.name} already serves model {self.model.fingerprint}; "
                          "restart the service to change the model")
        try:
            header, blobs = transport.receive_stream(  # the owner may send 80% of free memory
                request_iterator, mem_available() * 8 // 10)
            model, weight_shares = self._parse_model(header, blobs)
        except (transport.FrameError, ValueError, KeyError, TypeError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad upload: {err}")
        done = threading.Event()
        self.work.put(("load", model, weight_shares, done))
        if not done.wait(self.cluster.timeout_s) or self.model is None:
            context.abort(grpc.StatusCode.INTERNAL, f"node {self.name} could not load the model")
        return transport.pack({"node": self.name, "digests": self.model.digests})

    def _parse_model(self, header: dict, blobs: list[bytes]) -> tuple[Model, list]:
        programs, executables, input_bytes, digests = {}, {}, {}, {}
        i = 0
        for bucket, meta in header["programs"].items():
            n = len(meta["segments"])
            prog = CompiledForward.from_wire(meta, blobs[i:i + n])
            i += n
            programs[bucket] = prog
            executables[bucket] = [seg.load() for seg in prog.segments]
            input_bytes[bucket] = [math.prod(s) * self.per_elem for s in prog.input_shapes]
            digests[bucket] = program_digest(prog)
        names = next(iter(programs.values())).param_names
        if any(p.param_names != names for p in programs.values()):
            raise ValueError("the buckets' programs disagree on the parameters")
        weight_shares = blobs_to_shares(header["counts"], blobs[i:])
        if len(weight_shares) != len(names):
            raise ValueError(f"{len(weight_shares)} weight shares for {len(names)} parameters")
        return Model(str(header["fingerprint"]), programs, executables, input_bytes, digests,
                     sum(len(b) for b in blobs[i:])), weight_shares

    def _query(self, request_iterator, context) -> bytes:
        self._require(context, "client")
        model = self.model
        if model is None:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"node {self.name} has no model yet (the service is starting); retry")

        def sizes_ok(header) -> str | None:
            bucket = header.get("bucket")
            if bucket not in model.input_bytes:
                return f"unknown bucket {bucket!r}; served: {sorted(model.input_bytes)}"
            counts = header.get("counts")
            want = model.input_bytes[bucket]
            if not isinstance(counts, list) or len(counts) != len(want):
                return "wrong number of input shares"
            sizes, k = header["sizes"], 0
            for c, data in zip(counts, want, strict=True):
                if not isinstance(c, int) or c < 0 or k + 1 + c > len(sizes):
                    return "bad share counts"
                got = sum(sizes[k + 1:k + 1 + c])
                if (sizes[k] > _MAX_META or c > 1 + data // _MIN_CHUNK
                        or not data <= got <= data + CHUNK_OVERHEAD * c):
                    return f"input shares of bucket {bucket} must hold {data} bytes of data"
                k += 1 + c
            return None if k == len(sizes) else "bad share counts"

        with self.lock:  # refuse a full queue before reading any share
            waiting = self.receiving + sum(q.state != "done" for q in self.queries.values())
            if waiting >= self.cluster.max_queue:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"queue full ({waiting} queries waiting at node {self.name}); "
                              "retry later")
            self.receiving += 1
        try:
            header = transport.parse_header(next(request_iterator))
            if header.get("fingerprint") != model.fingerprint:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"model changed: the service now runs {model.fingerprint}, the "
                              f"client expects {header.get('fingerprint')}; re-read the endpoint")
            qid = header.get("query_id")
            if not isinstance(qid, str) or not _QID.fullmatch(qid):
                raise transport.FrameError("query_id must be 32 hex digits")
            header, blobs = transport.receive_stream(request_iterator, None, sizes_ok, header)
            shares = blobs_to_shares(header["counts"], blobs)
        except (transport.FrameError, ValueError, StopIteration) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad query: {err}")
        finally:
            with self.lock:
                self.receiving -= 1
        with self.lock:
            if qid in self.queries:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"query {qid} was already sent")
            q = Query(qid, header["bucket"], shares)
            self.queries[qid] = q
            self.lock.notify_all()
        context.add_callback(lambda: self._forget(q))
        if self.leader:
            self.work.put(("propose", q))
        remaining = context.time_remaining()
        q.done.wait(remaining if remaining is not None else None)
        if not q.done.is_set():
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"query {qid} was not answered in time (queue busy)")
        if q.error is not None:
            context.abort(*q.error)
        return q.response

    def _forget(self, q: Query) -> None:
        # The call ended (answered, cancelled, past its deadline). A query node 0 has already
        # prepared stays: every node must take part in a run node 0 may commit, and _run
        # forgets it afterwards.
        with self.lock:
            if q.state == "waiting":
                q.finish(error=(grpc.StatusCode.CANCELLED, "cancelled by the client"))
            if q.state == "done":
                self.queries.pop(q.qid, None)

    def _prepare(self, request: bytes, context) -> bytes:
        self._require(context, "node", name=self.ids[0])
        qid = json.loads(request)["query_id"]
        deadline = time.monotonic() + self.cluster.share_wait_s
        with self.lock:
            while (q := self.queries.get(qid)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping.is_set():
                    return transport.pack({"ok": False, "reason": f"node {self.name} did not "
                                           f"receive the shares within {self.cluster.share_wait_s}"
                                           " s"})
                self.lock.wait(min(left, 0.5))
            if q.state != "waiting":
                return transport.pack({"ok": False, "reason": f"query {qid} is {q.state} at "
                                       f"node {self.name}"})
            q.state = "prepared"
        return transport.pack({"ok": True})

    def _commit(self, request: bytes, context) -> bytes:
        self._require(context, "node", name=self.ids[0])
        msg = json.loads(request)
        with self.lock:
            q = self.queries.get(msg["query_id"])
        if msg["run"]:
            # Run it even if its caller left: every node must take part in every committed run.
            self.work.put(("run", q, msg["query_id"], msg["bucket"]))
        elif q is not None and q.state != "done":
            q.finish(error=(grpc.StatusCode.ABORTED, msg.get("reason", "aborted by node 0")))
        return transport.pack({"ok": True})

    def _info(self, request: bytes, context) -> bytes:
        self._require(context, "owner", "client", "node")
        model = self.model
        return transport.pack({
            "node": self.name, "rank": self.rank, "pid": os.getpid(), "ready": model is not None,
            "fingerprint": model.fingerprint if model else None,
            "buckets": sorted(model.programs) if model else [],
            "program_digests": model.digests if model else {},
            "served": self.served, "tunnel_refusals": self.tunnels.refusals})

    def _shutdown(self, request: bytes, context) -> bytes:
        self._require(context, "owner")
        self.work.put(("stop",))
        # An MPC run stuck on a dead peer would hold the main thread until the link's
        # timeout: leave anyway, without a trace on disk, if it has not stopped in seconds.
        timer = threading.Timer(_SHUTDOWN_GRACE_S, self._exit_now)
        timer.daemon = True
        timer.start()
        return transport.pack({"ok": True})

    def _exit_now(self) -> None:
        if self.stopping.is_set():  # stopping normally
            return
        print(f"spu_run node {self.name}: stopped while an MPC run was still waiting",
              file=sys.stderr, flush=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        os._exit(3)

    # ------------------------------------------------------------------ the MPC thread

    def serve_forever(self) -> None:
        """Runs uploads and queries in order until stopped; raises NodeFailure on MPC errors."""
        while not self.stopping.is_set():
            try:
                item = self.work.get(timeout=0.5)
            except queue.Empty:
                continue
            kind = item[0]
            if kind == "stop":
                return
            if kind == "load":
                self._load(*item[1:])
            elif kind == "propose":
                self._lead(item[1])
            elif kind == "run":
                self._run(*item[1:])

    def _load(self, model: Model, weight_shares: list, done) -> None:
        names = next(iter(model.programs.values())).param_names
        for name, share in zip(names, weight_shares, strict=True):
            self.rt.set_var(name, share)
        self.model = model
        done.set()

    def _peer(self, j: int):
        if j not in self._peers:
            node = self.cluster.nodes[j]
            self._peers[j] = transport.channel(f"{node.io[0]}:{node.io[1]}", node.id, self.ident)
        return self._peers[j]

    def _lead(self, q: Query) -> None:
        with self.lock:
            if q.state != "waiting":
                return  # the client left before its turn
            q.state = "prepared"
        followers = range(1, len(self.ids))
        msg = json.dumps({"query_id": q.qid}).encode()
        calls = [transport.unary(self._peer(j), "Prepare").future(
            msg, timeout=self.cluster.share_wait_s + 10) for j in followers]
        reasons = []
        for j, call in zip(followers, calls, strict=True):
            try:
                reply, _ = transport.unpack(call.result())
                if not reply.get("ok"):
                    reasons.append(reply.get("reason", f"node {self.ids[j]} refused"))
            except grpc.RpcError as err:
                reasons.append(f"node {self.ids[j]} unreachable: {transport.error_text(err)}")
        run = not reasons
        commit = json.dumps({"query_id": q.qid, "bucket": q.bucket, "run": run,
                             "reason": "; ".join(reasons)}).encode()
        for j in followers:
            try:
                transport.unary(self._peer(j), "Commit")(commit, timeout=30)
            except grpc.RpcError as err:
                if run:
                    q.finish(error=(grpc.StatusCode.UNAVAILABLE,
                                    f"node {self.ids[j]} unreachable; retry"))
                    raise NodeFailure(f"node {self.ids[j]} did not take the commit of a query: "
                                      f"{transport.error_text(err)}") from None
        if run:
            self._run(q, q.qid, q.bucket)
        else:
            q.finish(error=(grpc.StatusCode.ABORTED, "; ".join(reasons)))

    def _run(self, q: Query | None, qid: str, bucket: str) -> None:
        model = self.model
        if q is None or not q.shares:
            # Node 0 committed a query whose shares this node no longer holds: the nodes can
            # no longer run in step. Fail loudly; the service restarts the nodes.
            raise NodeFailure(f"node {self.name} was told to run query {qid} without its "
                              "shares")
        q.state = "running"
        prog = model.programs[bucket]
        for name, share in zip(prog.input_names, q.shares, strict=True):
            self.rt.set_var(name, share)
        log = self.dir / "query.log"
        setup_spu_log(log)
        start = time.perf_counter()
        try:
            run_segments(self.rt, prog, model.executables[bucket])
            out = self.rt.get_var(prog.output_name)
        except RuntimeError as err:
            q.finish(error=(grpc.StatusCode.UNAVAILABLE,
                            "a compute node failed during the query; retry"))
            raise NodeFailure(f"node {self.name}: the MPC run failed (another node down?): "
                              f"{str(err).splitlines()[0][:300]}") from None
        finally:
            for name in prog.input_names:
                try:
                    self.rt.del_var(name)
                except Exception:
                    pass
        wall = time.perf_counter() - start
        setup_spu_log(self.dir / "idle.log")  # flushes the query's profile
        profile = profile_of(log, wall)
        log.unlink(missing_ok=True)
        profile["owner_bytes"] = model.owner_bytes
        counts, blobs = shares_to_blobs([out])
        self.served += 1
        q.finish(transport.pack({"query_id": qid, "node": self.name, "counts": counts,
                                 "profile": profile}, blobs))
        with self.lock:
            self.queries.pop(qid, None)


def node_main(cluster: ClusterConfig, rank: int, ident: Identity,
              workdir: str | None = None, plain_link: bool = False) -> None:
    """Runs node ``rank`` until the owner says stop, SIGTERM/SIGINT, or a failure.

    ``workdir``: a private folder for the node's sockets and logs, made and removed by the
    caller (the service); None makes (and removes) one here. ``plain_link`` (benchmarks
    only, never exposed by ``spu_run``) runs brpc over the config's link ports without the
    TLS tunnels, to measure what the tunnels cost.
    """
    own = workdir is None
    path = Path(tempfile.mkdtemp(prefix="spu_") if own else workdir)
    os.chmod(path, 0o700)
    setup_spu_log(path / "idle.log")
    node = Node(cluster, rank, ident, path, plain_link)

    def on_signal(signum, frame):
        node.work.put(("stop",))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start()
        print(f"spu_run node {node.name}: ready (io {cluster.nodes[rank].io[0]}:"
              f"{cluster.nodes[rank].io[1]}, link {cluster.nodes[rank].link_addr})",
              file=sys.stderr, flush=True)
        node.serve_forever()
    finally:
        node.stop()
        if own:
            shutil.rmtree(path, ignore_errors=True)
