"""The jax-free core every party uses: shares in and out, running segments, SPU's log.

Node processes import this (and program.py, cost.py, transport.py, tunnel.py, tls.py), none
of which imports jax, flax or the models: a node needs neither the weights' code nor the
tracer. (SPU 0.9.5's own package init imports jax, so the module is loaded all the same; no
jax code runs in a node.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

import numpy as np
import spu
import spu.libspu as libspu

from mpcformer_jax.private.cost import parse_profile
from mpcformer_jax.private.program import CompiledForward


def setup_spu_log(path: str | os.PathLike) -> None:
    """Routes SPU's log (profiles included) to ``path`` instead of the console."""
    opts = libspu.logging.LogOptions()
    opts.enable_console_logger = False
    opts.system_log_path = str(path)
    libspu.logging.setup_logging(opts)


@contextlib.contextmanager
def stdout_to_stderr():
    """Sends everything written to file descriptor 1 to stderr, except Python's own stdout.

    SPU's C++ logger prints lines such as ``[info] [thread_pool.cc:30] Create a fixed thread
    pool`` straight to fd 1 before any log options can be set; a command that promises
    machine-readable stdout wraps its work in this, and prints its result through the
    ``sys.stdout`` it is given (which still reaches the real stdout).
    """
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    saved = sys.stdout
    sys.stdout = os.fdopen(os.dup(real), "w", buffering=1)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout.close()
        sys.stdout = saved
        os.dup2(real, 1)
        os.close(real)


def share_bytes(shares) -> int:
    """Bytes of one party's share list (what crosses the wire to that party)."""
    return sum(len(c) for s in shares for c in s.share_chunks) + sum(len(s.meta) for s in shares)


def make_shares(io: spu.Io, arrays: dict[str, np.ndarray]) -> dict[str, list]:
    """Secret-shares each named array: ``{name: [share for rank 0, rank 1, ...]}``."""
    return {name: io.make_shares(np.asarray(a), libspu.Visibility.VIS_SECRET)
            for name, a in arrays.items()}


def shares_to_blobs(shares) -> tuple[list[int], list[bytes]]:
    """Flattens SPU shares into blobs: per share, its meta then its chunks."""
    counts, blobs = [], []
    for share in shares:
        chunks = list(share.share_chunks)
        counts.append(len(chunks))
        blobs += [share.meta, *chunks]
    return counts, blobs


def blobs_to_shares(counts: list[int], blobs: list[bytes]) -> list:
    """Inverse of ``shares_to_blobs``; a count list that does not match raises ValueError."""
    if sum(counts) + len(counts) != len(blobs) or any(c < 0 for c in counts):
        raise ValueError("share counts do not match the blobs sent")
    shares, i = [], 0
    for n in counts:
        share = libspu.Share()
        share.meta = blobs[i]
        share.share_chunks = list(blobs[i + 1:i + 1 + n])
        shares.append(share)
        i += 1 + n
    return shares


# A share chunk is a small protobuf around the ring elements: a few bytes of framing each.
CHUNK_OVERHEAD = 64


def bytes_per_element(rt_config: libspu.RuntimeConfig, world_size: int) -> int:
    """Share bytes one party holds per secret float element under this protocol and field
    (chunk framing excluded: the difference of two sizes).

    Nodes use it to know, before reading a byte, how large a client's shares must be.
    """
    io = spu.Io(world_size, rt_config)

    def size(n: int) -> int:
        share = io.make_shares(np.zeros((n,), np.float32), libspu.Visibility.VIS_SECRET)[0]
        return sum(len(c) for c in share.share_chunks)

    return (size(64) - size(32)) // 32


def run_segments(rt: spu.Runtime, compiled: CompiledForward, executables,
                 barrier: threading.Barrier | None = None) -> None:
    """Runs every segment on one party's runtime, freeing intermediates as it goes."""
    for seg, exe in zip(compiled.segments, executables, strict=True):
        rt.run(exe)
        for name in seg.drop_after:
            rt.del_var(name)
        if barrier is not None:
            # Keeps each segment's profile lines apart from the next segment's in the log.
            barrier.wait()


def profile_of(log: Path, wall_s: float) -> dict:
    """One party's profile of one run, parsed from its SPU log: JSON-ready."""
    by_exe, links, _ = parse_profile(log.read_text() if log.exists() else "")
    return {"wall_s": wall_s,
            "by_exe": {e: {op: [t.bytes, t.messages, t.time_s] for op, t in ops.items()}
                       for e, ops in by_exe.items()},
            "link": [sum(getattr(li, f) for li in links)
                     for f in ("send_bytes", "recv_bytes", "send_messages", "recv_messages")]}


def mem_available() -> int:
    """Bytes of memory this machine can still give (MemAvailable), or a huge number if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
