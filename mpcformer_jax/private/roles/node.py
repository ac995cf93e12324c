"""A compute node: holds weight shares and executables, answers queries until stopped.

A node sees shares only. Its life:

1. open its gRPC service (mutual TLS; callers are known by certificate) and its tunnels to the
   other nodes (tunnel.py), join them over SPU's brpc link and create the SPU runtime (a
   collective among the nodes, done before serving: see ``_connect``);
2. accept one upload from the *owner*: the executables of every (batch, length) bucket and
   this node's share of every weight;
3. answer *client* queries, several clients' at a time. Every node must run the same
   execution at the same time, so node 0 plans them (batching.py): from the queries in the
   order their shares reached it, a prefix that fits one bucket, as soon as it cannot grow or
   ``max_batch_delay_ms`` after the oldest arrived. It asks every other node to hold those
   queries (``Prepare``, waiting up to ``share_wait_s`` for late shares), then tells them to
   run the batch (``Commit``) or, if some node lacks a query, drops that query (a retriable
   error for its client) and plans again. Each node joins the batch's input shares locally
   (shares.py), runs the bucket's program and returns each query only its own rows of its
   share of the logits, to the client that asked, on the call that asked.

Only the MPC thread (the process's main thread) touches the SPU runtime; gRPC handlers hand
it work through a queue. If an MPC run fails (a peer died), the node answers the query with
an error and exits: the brpc link cannot be trusted afterwards, and the service restarts the
nodes (service.py).
"""

from __future__ import annotations

import dataclasses
import faulthandler
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
import numpy as np
import spu
import spu.libspu as libspu

from mpcformer_jax.private import transport
from mpcformer_jax.private.batching import (
    Plan,
    Stats,
    Waiting,
    plan_batch,
    process_figures,
    release_free_memory,
)
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
from mpcformer_jax.private.shares import ShareError, join_rows, split_rows, to_array
from mpcformer_jax.private.tls import Identity
from mpcformer_jax.private.tunnel import Tunnels

_QID = re.compile(r"[0-9a-f]{32}")
_MAX_META = 4096  # bytes of one share's metadata (shape, type); the data is counted exactly
_MIN_CHUNK = 1 << 16  # a share arrives in few chunks; this bounds how many a caller may claim
_SHUTDOWN_GRACE_S = 5.0
_TEARDOWN_S = 15.0  # a stopping node's longest teardown


class NodeFailure(RuntimeError):
    """The node cannot go on (its MPC link failed); the process exits non-zero."""


@dataclasses.dataclass
class Query:
    """One client query as this node holds it: ``rows`` texts of ``length`` tokens."""

    qid: str
    rows: int
    length: int
    shares: list
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    response: bytes | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    state: str = "waiting"  # waiting -> prepared -> running -> done (prepared -> waiting)

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
    widths: list[tuple[int, ...]]  # per client input: its shape after (batch, length)
    digests: dict[str, str]
    owner_bytes: int

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [tuple(int(x) for x in k.split("x")) for k in self.programs]

    @property
    def max_rows(self) -> int:
        return max(b for b, _ in self.buckets)

    @property
    def max_length(self) -> int:
        return max(n for _, n in self.buckets)


def share_kind(cluster: ClusterConfig) -> tuple[str, int, int]:
    """(storage type, data type, bytes per element) of a client's input share under this
    protocol, e.g. ``("aby3.AShr<FM64>", DT_F32, 16)``: what every query share must be."""
    io = spu.Io(cluster.world_size, cluster.runtime_config())
    share = io.make_shares(np.zeros((1, 1), np.float32), libspu.Visibility.VIS_SECRET)[0]
    meta, words = to_array(share)
    return meta.storage_type, meta.data_type, words.shape[-1]


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
        self.share_kind = share_kind(cluster)
        self.server = None
        self.tunnels = None
        self.lctx = None
        self.rt = None
        self._peers = {}
        self.served = 0  # executions run
        self.executions = 0  # node 0: executions proposed (numbers them)
        self.stats = Stats()  # node 0's are the service's figures
        self.free_since = float("-inf")  # node 0: when its last execution ended
        self.receiving = 0  # query streams being read (they count against max_queue)
        self.settled_rss = None  # RSS right after the last execution, freed memory returned

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
        # No ``lctx.stop_link()``: it is yacl's WaitLinkTaskFinish, a handshake with every
        # peer (send a Fin, wait, unbounded, for theirs). Nodes stop one after another, so a
        # peer is often gone already: the wait hung, or the Fin's failed async send ran
        # yacl's exit(-1) (``exit_if_async_error``, not settable from SPU 0.9.5's Python).
        # Both were seen in CI. A node stops only between executions, so nothing is in
        # flight for the handshake to flush; the sockets close with the process.
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
        programs, executables, digests = {}, {}, {}
        i = 0
        for bucket, meta in header["programs"].items():
            n = len(meta["segments"])
            prog = CompiledForward.from_wire(meta, blobs[i:i + n])
            i += n
            b, length = (int(x) for x in bucket.split("x"))
            if any(tuple(s[:2]) != (b, length) for s in prog.input_shapes):
                raise ValueError(f"bucket {bucket}'s program takes inputs {prog.input_shapes}")
            programs[bucket] = prog
            executables[bucket] = [seg.load() for seg in prog.segments]
            digests[bucket] = program_digest(prog)
        first = next(iter(programs.values()))
        if any(p.param_names != first.param_names for p in programs.values()):
            raise ValueError("the buckets' programs disagree on the parameters")
        widths = [tuple(s[2:]) for s in first.input_shapes]
        if any([tuple(s[2:]) for s in p.input_shapes] != widths for p in programs.values()):
            raise ValueError("the buckets' programs disagree on the input widths")
        weight_shares = blobs_to_shares(header["counts"], blobs[i:])
        if len(weight_shares) != len(first.param_names):
            raise ValueError(f"{len(weight_shares)} weight shares for "
                             f"{len(first.param_names)} parameters")
        return Model(str(header["fingerprint"]), programs, executables, widths, digests,
                     sum(len(b) for b in blobs[i:])), weight_shares

    def _query(self, request_iterator, context) -> bytes:
        self._require(context, "client")
        model = self.model
        if model is None:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"node {self.name} has no model yet (the service is starting); retry")

        def shape_ok(header) -> str | None:
            rows, length = header.get("rows"), header.get("length")
            if not (isinstance(rows, int) and isinstance(length, int)) or rows < 1 or length < 1:
                return "a query declares its 'rows' and 'length' (positive integers)"
            if rows > model.max_rows:
                return (f"a query of {rows} texts is larger than any served bucket (at most "
                        f"{model.max_rows} texts an execution); split it into queries of at "
                        f"most {model.max_rows} (Client.classify does)")
            if length > model.max_length:
                return (f"a query of {length} tokens is longer than any served bucket (at "
                        f"most {model.max_length}); truncate the texts")
            return None

        def sizes_ok(header) -> str | None:
            if why := shape_ok(header):
                return why
            counts = header.get("counts")
            want = [header["rows"] * header["length"] * math.prod(w) * self.per_elem
                    for w in model.widths]
            if not isinstance(counts, list) or len(counts) != len(want):
                return "wrong number of input shares"
            sizes, k = header["sizes"], 0
            for c, data in zip(counts, want, strict=True):
                if not isinstance(c, int) or c < 0 or k + 1 + c > len(sizes):
                    return "bad share counts"
                got = sum(sizes[k + 1:k + 1 + c])
                if (sizes[k] > _MAX_META or c > 1 + data // _MIN_CHUNK
                        or not data <= got <= data + CHUNK_OVERHEAD * c):
                    return (f"input shares of {header['rows']}x{header['length']} must hold "
                            f"{data} bytes of data")
                k += 1 + c
            return None if k == len(sizes) else "bad share counts"

        with self.lock:  # refuse a full queue before reading any share
            waiting = self.receiving + sum(q.state != "done" for q in self.queries.values())
            if waiting >= self.cluster.max_queue:
                self._count_failure("RESOURCE_EXHAUSTED")
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
            self._check_shares(shares, header["rows"], header["length"], model)
        except (transport.FrameError, ShareError, ValueError, StopIteration) as err:
            self._count_failure("INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad query: {err}")
        finally:
            with self.lock:
                self.receiving -= 1
        with self.lock:
            if qid in self.queries:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"query {qid} was already sent")
            q = Query(qid, header["rows"], header["length"], shares)
            self.queries[qid] = q
            self.lock.notify_all()
        context.add_callback(lambda: self._forget(q))
        if self.leader:
            self.work.put(("wake",))
        remaining = context.time_remaining()
        q.done.wait(remaining if remaining is not None else None)
        if not q.done.is_set():
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"query {qid} was not answered in time (queue busy)")
        if q.error is not None:
            context.abort(*q.error)
        return q.response

    def _check_shares(self, shares: list, rows: int, length: int, model: Model) -> None:
        """Each share is of the declared shape and of this protocol's arithmetic kind, so
        that joining it with other queries' shares cannot fail later, in the middle of a
        batch (a broken share refused here never reaches an execution)."""
        for share, width in zip(shares, model.widths, strict=True):
            meta, words = to_array(share)
            if words.shape[:-1] != (rows, length, *width):
                raise ShareError(f"a share of shape {words.shape[:-1]} where "
                                 f"{(rows, length, *width)} was declared")
            if (meta.storage_type, meta.data_type, words.shape[-1]) != self.share_kind:
                raise ShareError(f"a share of kind {meta.storage_type!r} where "
                                 f"{self.share_kind[0]!r} is served")

    def _forget(self, q: Query) -> None:
        # The call ended (answered, cancelled, past its deadline). A query node 0 has already
        # prepared stays: every node must take part in a run node 0 may commit, and _run
        # forgets it afterwards.
        with self.lock:
            if q.state == "waiting":
                q.finish(error=(grpc.StatusCode.CANCELLED, "cancelled by the client"))
                self._count_failure("CANCELLED")
            if q.state == "done":
                self.queries.pop(q.qid, None)

    def _count_failure(self, code: str) -> None:
        if self.leader:
            self.stats.fail(code)

    def _prepare(self, request: bytes, context) -> bytes:
        """Node 0 proposes a batch: hold its queries for it, if every one has arrived here
        (waiting up to ``share_wait_s`` for the stragglers); else say which are missing."""
        self._require(context, "node", name=self.ids[0])
        qids = json.loads(request)["queries"]
        deadline = time.monotonic() + self.cluster.share_wait_s
        with self.lock:
            while True:
                missing = [k for k in qids if (q := self.queries.get(k)) is None
                           or q.state != "waiting"]
                left = deadline - time.monotonic()
                if not missing or left <= 0 or self.stopping.is_set():
                    break
                self.lock.wait(min(left, 0.5))
            if missing:
                return transport.pack({"ok": False, "missing": missing, "reason": (
                    f"node {self.name} did not receive the shares of {len(missing)} of the "
                    f"batch's queries within {self.cluster.share_wait_s} s")})
            for k in qids:
                self.queries[k].state = "prepared"
        return transport.pack({"ok": True})

    def _commit(self, request: bytes, context) -> bytes:
        self._require(context, "node", name=self.ids[0])
        msg = json.loads(request)
        if msg["run"]:
            # Run it even if some caller left: every node must take part in every committed run.
            self.work.put(("run", msg))
            return transport.pack({"ok": True})
        with self.lock:  # not run: the queries wait for another batch
            for k in msg["queries"]:
                q = self.queries.get(k)
                if q is not None and q.state == "prepared":
                    q.state = "waiting"
            for k in msg.get("drop", []):
                q = self.queries.get(k)
                if q is not None and q.state != "done":
                    q.finish(error=(grpc.StatusCode.ABORTED, msg.get("reason", "dropped")))
                    self.queries.pop(k, None)
        return transport.pack({"ok": True})

    def _info(self, request: bytes, context) -> bytes:
        self._require(context, "owner", "client", "node")
        model = self.model
        with self.lock:
            depth = sum(q.state in ("waiting", "prepared") for q in self.queries.values())
        info = {
            "node": self.name, "rank": self.rank, "pid": os.getpid(), "ready": model is not None,
            "fingerprint": model.fingerprint if model else None,
            "buckets": sorted(model.programs) if model else [],
            "program_digests": model.digests if model else {},
            "served": self.served, "tunnel_refusals": self.tunnels.refusals,
            "queue_depth": depth, "uptime_s": round(time.time() - self.stats.started, 1),
            "rss_settled_bytes": self.settled_rss, **process_figures()}
        if self.leader:
            info["stats"] = self.stats.snapshot()
        return transport.pack(info)

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
        """Runs uploads and executions in order until stopped; raises NodeFailure on MPC errors.

        Node 0 also batches here: after every event it plans the next execution from the
        queries waiting (batching.py) and runs it when it is full or its delay is up.
        """
        while not self.stopping.is_set():
            timeout = 0.5
            if self.leader and self.model is not None:
                plan = self._plan()
                if plan is not None and plan.run_now:
                    self._lead(plan)
                    continue
                if plan is not None:
                    timeout = min(timeout, max(plan.wait_s, 0.001))
            try:
                item = self.work.get(timeout=timeout)
            except queue.Empty:
                continue
            kind = item[0]
            if kind == "stop":
                return
            if kind == "load":
                self._load(*item[1:])
            elif kind == "run":
                self._run(item[1])

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

    def _plan(self) -> Plan | None:
        with self.lock:
            waiting = [Waiting(q.qid, q.rows, q.length, q.arrived)
                       for q in self.queries.values() if q.state == "waiting"]
        return plan_batch(waiting, self.model.buckets, time.monotonic(),
                          self.cluster.max_batch_delay_s, self.cluster.batching,
                          self.free_since)

    def _lead(self, plan: Plan) -> None:
        """Node 0: prepare the planned batch on every node, then commit and run it; queries
        a node did not receive are dropped (their clients get a retriable error) and the
        rest wait for the next plan."""
        with self.lock:
            queries = [self.queries.get(k) for k in plan.qids]
            if any(q is None or q.state != "waiting" for q in queries):
                return  # a client left since the plan: plan again
            for q in queries:
                q.state = "prepared"
        followers = range(1, len(self.ids))
        msg = json.dumps({"queries": list(plan.qids)}).encode()
        calls = [transport.unary(self._peer(j), "Prepare").future(
            msg, timeout=self.cluster.share_wait_s + 10) for j in followers]
        missing, reasons = set(), []
        for j, call in zip(followers, calls, strict=True):
            try:
                reply, _ = transport.unpack(call.result())
                if not reply.get("ok"):
                    named = set(reply.get("missing") or ()) & set(plan.qids)
                    missing.update(named or plan.qids)
                    reasons.append(str(reply.get("reason", f"node {self.ids[j]} refused")))
            except (grpc.RpcError, transport.FrameError) as err:
                missing.update(plan.qids)
                text = transport.error_text(err) if isinstance(err, grpc.RpcError) else err
                reasons.append(f"node {self.ids[j]} unreachable: {text}")
        self.executions += 1
        run = not missing
        b, n = plan.bucket
        commit = {"execution": self.executions, "run": run, "bucket": f"{b}x{n}",
                  "queries": list(plan.qids), "drop": sorted(missing),
                  "reason": "; ".join(reasons) + "; send the query again"}
        encoded = json.dumps(commit).encode()
        for j in followers:
            try:
                transport.unary(self._peer(j), "Commit")(encoded, timeout=30)
            except grpc.RpcError as err:
                if run:
                    for q in queries:
                        q.finish(error=(grpc.StatusCode.UNAVAILABLE,
                                        f"node {self.ids[j]} unreachable; retry"))
                        self._count_failure("UNAVAILABLE")
                    raise NodeFailure(f"node {self.ids[j]} did not take the commit of a "
                                      f"batch: {transport.error_text(err)}") from None
        if run:
            self._run(commit)
            return
        with self.lock:
            for q in queries:
                if q.qid in missing:
                    q.finish(error=(grpc.StatusCode.ABORTED, commit["reason"]))
                    self._count_failure("ABORTED")
                    self.queries.pop(q.qid, None)
                elif q.state == "prepared":
                    q.state = "waiting"

    def _run(self, batch: dict) -> None:
        """Runs one committed execution: joins its queries' input shares (locally), runs the
        bucket's program, and answers each query with only its own rows of the output."""
        model = self.model
        with self.lock:
            queries = [self.queries.get(k) for k in batch["queries"]]
        if any(q is None or not q.shares for q in queries):
            # Node 0 committed a query whose shares this node no longer holds: the nodes can
            # no longer run in step. Fail loudly; the service restarts the nodes.
            raise NodeFailure(f"node {self.name} was told to run execution "
                              f"{batch['execution']} without all its queries' shares")
        bucket = batch["bucket"]
        b, n = (int(x) for x in bucket.split("x"))
        prog = model.programs[bucket]
        start = time.perf_counter()
        started = time.monotonic()
        for q in queries:
            q.state = "running"
        for i, name in enumerate(prog.input_names):
            self.rt.set_var(name, join_rows([q.shares[i] for q in queries], b, n))
        join_s = time.perf_counter() - start
        log = self.dir / "query.log"
        setup_spu_log(log)
        try:
            run_segments(self.rt, prog, model.executables[bucket])
            out = self.rt.get_var(prog.output_name)
        except RuntimeError as err:
            for q in queries:
                q.finish(error=(grpc.StatusCode.UNAVAILABLE,
                                "a compute node failed during the query; retry"))
                self._count_failure("UNAVAILABLE")
            raise NodeFailure(f"node {self.name}: the MPC run failed (another node down?): "
                              f"{str(err).splitlines()[0][:300]}") from None
        finally:
            for name in prog.input_names:
                try:
                    self.rt.del_var(name)
                except Exception:
                    pass
        wall = time.perf_counter() - start
        setup_spu_log(self.dir / "idle.log")  # flushes the execution's profile
        profile = profile_of(log, wall)
        log.unlink(missing_ok=True)
        profile["owner_bytes"] = model.owner_bytes
        rows = sum(q.rows for q in queries)
        execution = {"execution": batch["execution"], "bucket": bucket, "rows_used": rows,
                     "rows_padded": b - rows, "queries": len(queries),
                     "join_s": round(join_s, 4), "run_s": round(wall, 4)}
        self.served += 1
        if self.leader:
            self.stats.batch(rows, b - rows)
            waits = [started - q.arrived for q in queries]
            print(f"spu_run node {self.name}: execution {batch['execution']}: bucket {bucket}, "
                  f"{len(queries)} queries, {rows} rows used, {b - rows} padded, waited up to "
                  f"{max(waits):.2f} s, ran {wall:.2f} s", file=sys.stderr, flush=True)
        for q, piece in zip(queries, split_rows(out, [q.rows for q in queries]), strict=True):
            counts, blobs = shares_to_blobs([piece])
            wait = started - q.arrived
            q.finish(transport.pack({"query_id": q.qid, "node": self.name, "counts": counts,
                                     "profile": profile,
                                     "batch": {**execution, "rows": q.rows,
                                               "wait_s": round(wait, 4)}}, blobs))
            if self.leader:
                self.stats.answer(time.monotonic() - q.arrived)
        with self.lock:
            for q in queries:
                self.queries.pop(q.qid, None)
        del out, queries
        self.settled_rss = release_free_memory()
        self.free_since = time.monotonic()


def node_main(cluster: ClusterConfig, rank: int, ident: Identity,
              workdir: str | None = None, plain_link: bool = False) -> None:
    """Runs node ``rank`` until the owner says stop, SIGTERM/SIGINT, or a failure.

    ``workdir``: a private folder for the node's sockets and logs, made and removed by the
    caller (the service); None makes (and removes) one here. ``plain_link`` (benchmarks
    only, never exposed by ``spu_run``) runs brpc over the config's link ports without the
    TLS tunnels, to measure what the tunnels cost.
    """
    own = workdir is None
    path = Path(tempfile.mkdtemp(prefix="spu_") if own else workdir).resolve()
    os.chmod(path, 0o700)
    # SPU writes what it keeps on disk into the working directory (SEMI2K's Beaver cache:
    # a leveldb folder of the weights' opened masks, model.with_cached_weights), and removes
    # it only in destructors that a forced exit skips: keep it in this private folder, which
    # goes with the node. Every path the node needs is resolved by now.
    os.chdir(path)
    setup_spu_log(path / "idle.log")
    node = Node(cluster, rank, ident, path, plain_link)

    def on_signal(signum, frame):
        node.work.put(("stop",))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped_cleanly = False
    try:
        node.start()
        print(f"spu_run node {node.name}: ready (io {cluster.nodes[rank].io[0]}:"
              f"{cluster.nodes[rank].io[1]}, link {cluster.nodes[rank].link_addr})",
              file=sys.stderr, flush=True)
        node.serve_forever()
        stopped_cleanly = True
    finally:
        _arm_teardown_watchdog(node.name, path if own else None, 0 if stopped_cleanly else 2)
        node.stop()
        if own:
            shutil.rmtree(path, ignore_errors=True)


def _arm_teardown_watchdog(name: str, path: Path | None, code: int) -> None:
    """Bounds a node's teardown: closing the link or the listeners can block on a peer that
    is gone. After ``_TEARDOWN_S`` it prints every thread's stack (to see where), removes the
    node's folder and leaves with ``code``: the node had stopped serving either way."""
    def fire() -> None:
        print(f"spu_run node {name}: teardown took over {_TEARDOWN_S:.0f} s; leaving anyway. "
              "Threads:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        os._exit(code)

    timer = threading.Timer(_TEARDOWN_S, fire)
    timer.daemon = True
    timer.start()
