"""The model owner: the only role that reads the weights.

It prepares the model in plaintext (``private.model.prepare``: constants folded into the
weights, a public word table left out), compiles the forward once per (batch, length) bucket
(shapes only, no client data), secret-shares every weight with fresh randomness and
uploads each node its share and the executables, over mutual TLS. After that it holds
nothing the queries need; it stays to re-share if the nodes restart and to stop them.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from mpcformer_jax.private import transport
from mpcformer_jax.private.card import fingerprint
from mpcformer_jax.private.config import ClusterConfig
from mpcformer_jax.private.program import program_digest
from mpcformer_jax.private.tls import Identity

_BUCKET = re.compile(r"(\d+)x(\d+)")
_POLL_S = 0.5  # how often a waiting upload asks whether its nodes are still there


class OwnerError(RuntimeError):
    """The model cannot be served as asked; the message says what to change."""


def parse_buckets(text: str | list) -> list[tuple[int, int]]:
    """``"1x16,8x32"`` (or a list of such strings or pairs) -> sorted unique (batch, length)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        if isinstance(item, str):
            m = _BUCKET.fullmatch(item.strip())
            if not m:
                raise OwnerError(f"bad bucket {item!r}: write BATCHxLENGTH, e.g. 1x16,8x32")
            b, n = int(m.group(1)), int(m.group(2))
        else:
            b, n = (int(v) for v in item)
        if b < 1 or n < 2:
            raise OwnerError(f"bucket {b}x{n}: batch must be >= 1 and length >= 2")
        out.add((b, n))
    if not out:
        raise OwnerError("no bucket given; e.g. --buckets 1x16,8x32")
    return sorted(out, key=lambda bl: (bl[0] * bl[1], bl))


def bucket_name(batch: int, length: int) -> str:
    return f"{batch}x{length}"


@dataclasses.dataclass
class UploadReport:
    """One weight upload: bytes sent to each node, and how long sharing and sending took."""

    bytes_per_node: list[int]
    share_s: float
    send_s: float

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bytes": sum(self.bytes_per_node)}


class Owner:
    """Loads a model, compiles its buckets and uploads shares to the nodes of ``cluster``."""

    def __init__(self, model_dir: str | Path, cluster: ClusterConfig, buckets, ident: Identity,
                 attribution: str = "segments", salt: bytes = b""):
        import jax

        from mpcformer_jax.models import load_pretrained
        from mpcformer_jax.private.model import compile_for, prepare

        self.cluster, self.ident = cluster, ident
        # In plaintext, before compiling or sharing anything: fold the public constants into
        # the weights, and keep a public word table out of the shares (the client has it).
        self.config, params = prepare(*load_pretrained(model_dir)[:2], cluster.protocol)
        self.buckets = parse_buckets(buckets)
        too_long = [b for b in self.buckets if b[1] > self.config.max_length]
        if too_long:
            raise OwnerError(f"bucket length {too_long[0][1]} exceeds the model's "
                             f"{self.config.max_length} positions")
        self.leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]
        self.fingerprint = fingerprint(self.config, self.leaves + [np.frombuffer(salt, np.uint8)])
        start = time.perf_counter()
        copts = cluster.compiler_options()
        self.programs = {bucket_name(b, n): compile_for(self.config, params, b, n, copts,
                                                        attribution)
                         for b, n in self.buckets}
        self.compile_s = time.perf_counter() - start
        self.digests = {k: program_digest(p) for k, p in self.programs.items()}

    def upload(self, timeout_s: float | None = None,
               gone: Callable[[], str | None] | None = None) -> UploadReport:
        """Shares the weights afresh and sends every node its share and the programs.

        Waits up to ``timeout_s`` for nodes that are still starting; ``gone`` (polled while
        waiting) says why no node will come, e.g. a local node process has exited, and ends
        the wait at once.
        """
        import spu

        from mpcformer_jax.private.runtime import make_shares, shares_to_blobs

        timeout = timeout_s or self.cluster.timeout_s
        start = time.perf_counter()
        io = spu.Io(self.cluster.world_size, self.cluster.runtime_config())
        names = next(iter(self.programs.values())).param_names
        shares = make_shares(io, dict(zip(names, self.leaves, strict=True)))
        share_s = time.perf_counter() - start
        programs, exe_blobs = {}, []
        for key, prog in self.programs.items():
            meta, blobs = prog.to_wire()
            programs[key] = meta
            exe_blobs += blobs
        sent = [0] * self.cluster.world_size
        errors: list[str] = []

        def send(rank: int) -> None:
            node = self.cluster.nodes[rank]
            counts, blobs = shares_to_blobs([shares[n][rank] for n in names])
            blobs = exe_blobs + blobs
            ch = transport.channel(f"{node.io[0]}:{node.io[1]}", node.id, self.ident)
            try:
                call = transport.stream_unary(ch, "Upload")
                future = call.future(transport.stream_frames(
                    {"fingerprint": self.fingerprint, "programs": programs, "counts": counts},
                    blobs), timeout=timeout, wait_for_ready=True)
                while True:
                    try:
                        reply = future.result(timeout=_POLL_S)
                        break
                    except grpc.FutureTimeoutError:
                        reason = gone() if gone else None
                        if reason:
                            future.cancel()
                            errors.append(reason)
                            return
                header, _ = transport.unpack(reply)
                if header.get("digests") != self.digests:
                    errors.append(f"node {node.id} loaded other programs than were sent")
                sent[rank] = sum(len(b) for b in blobs)
            except Exception as err:  # grpc.RpcError or a frame error: say which node
                text = transport.error_text(err) if hasattr(err, "code") else str(err)
                errors.append(f"upload to node {node.id} at {node.io[0]}:{node.io[1]} failed: "
                              f"{text}")
            finally:
                ch.close()

        start = time.perf_counter()
        threads = [threading.Thread(target=send, args=(r,)) for r in range(len(sent))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise OwnerError("; ".join(errors))
        return UploadReport(sent, share_s, time.perf_counter() - start)

    def shutdown_nodes(self, timeout_s: float = 5.0) -> None:
        """Asks every node to stop (used when the nodes run on other hosts)."""
        for node in self.cluster.nodes:
            ch = transport.channel(f"{node.io[0]}:{node.io[1]}", node.id, self.ident)
            try:
                transport.unary(ch, "Shutdown")(b"{}", timeout=timeout_s)
            except Exception:
                pass
            finally:
                ch.close()
