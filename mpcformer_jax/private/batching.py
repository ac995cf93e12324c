"""Node 0's batcher: which waiting queries run together, in which bucket, and when; and the
service's aggregate figures. Pure Python, no SPU: the fast tests check it directly.

A query is ``rows`` texts padded (by the client) to ``length`` tokens. An execution runs one
compiled bucket ``(batch, length)``; the queries in it are stacked on the batch axis and
padded to the bucket's length, locally on the shares (shares.py).

The rule, as Triton's dynamic batcher and TF-Serving's batching: take the waiting queries in
arrival order, as many as fit one bucket, and wait at most ``max_batch_delay`` after the
oldest arrived for more to come, unless the batch is already as full as it can get. A batch
is always a *prefix* of the queue: no query ever runs before one that arrived earlier, so
none waits behind a batch that arrived after it (stricter than "at most one").
Among the buckets that hold the oldest query, the plan takes the one that runs the most rows
of that prefix, then the cheapest (batch x length): rounds, which dominate on a WAN, barely
grow with the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Waiting:
    """A query as the batcher sees it: no shares, only its size and arrival time."""

    qid: str
    rows: int
    length: int
    arrived: float  # time.monotonic() at node 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """The next execution: its bucket, its queries (in order) and whether to run it now."""

    bucket: tuple[int, int]
    qids: tuple[str, ...]
    rows: int
    run_now: bool
    wait_s: float  # until the oldest query's delay runs out (0 when run_now)

    @property
    def padded_rows(self) -> int:
        return self.bucket[0] - self.rows


def plan_batch(waiting: Sequence[Waiting], buckets: Sequence[tuple[int, int]], now: float,
               max_delay_s: float, batching: bool = True,
               free_since: float = float("-inf")) -> Plan | None:
    """The plan for the queue ``waiting`` (arrival order), or None when it is empty.

    Every query fits some bucket (the node refuses others on arrival). With ``batching``
    off, each query runs alone in the cheapest bucket that holds it (today's queue).

    ``free_since``: when node 0 finished its last execution. The delay runs from the later
    of that and the oldest arrival: the clients an execution just answered send their next
    queries within milliseconds, and a query that waited out the execution must not leave
    alone just before they arrive. (Without this, 8 clients settled into alternating
    executions of 7 rows and of 1: measured, 0.19 texts/s against 0.27 for full batches.)
    """
    if not waiting:
        return None
    best = None
    for b, n in sorted(buckets, key=lambda bn: (bn[0] * bn[1], bn)):
        rows, taken = 0, 0
        for q in waiting:
            if q.length > n or rows + q.rows > b or (taken and not batching):
                break
            rows, taken = rows + q.rows, taken + 1
        if taken == 0:
            continue
        if best is None or rows > best[0]:
            best = (rows, taken, (b, n))
    if best is None:
        raise ValueError(f"query {waiting[0].qid} of {waiting[0].rows}x{waiting[0].length} "
                         f"fits no bucket of {sorted(buckets)}")
    rows, taken, bucket = best
    # Full: no bucket of this length holds more rows, or the query after the prefix does
    # not fit with it (more arrivals queue behind that one: waiting cannot grow the batch).
    largest = max(b for b, n in buckets if n >= max(q.length for q in waiting[:taken]))
    full = not batching or rows >= largest or taken < len(waiting)
    wait = max(0.0, max(waiting[0].arrived, free_since) + max_delay_s - now)
    return Plan(bucket, tuple(q.qid for q in waiting[:taken]), rows, full or wait == 0.0,
                0.0 if full else wait)


class Stats:
    """What a provider watches, aggregate only (no text, logit or share): answered and
    failed queries (by gRPC status name), batches and their rows, latency percentiles over
    the last ``window`` answers."""

    def __init__(self, window: int = 2000):
        self.started = time.time()
        self.answered = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.batches = 0
        self.rows = 0
        self.padded_rows = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=window)

    def batch(self, rows: int, padded: int) -> None:
        self.batches += 1
        self.rows += rows
        self.padded_rows += padded

    def answer(self, latency_s: float) -> None:
        self.answered += 1
        self.latencies.append(latency_s)

    def fail(self, code: str) -> None:
        self.failed[code] += 1

    def snapshot(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))], 4)

        return {"answered": self.answered, "failed": dict(self.failed),
                "batches": self.batches, "rows": self.rows, "padded_rows": self.padded_rows,
                "mean_rows_per_batch": round(self.rows / self.batches, 3) if self.batches
                else None,
                "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95),
                "latency_window": len(lat)}


def process_figures() -> dict:
    """This process's resident memory, threads and open file descriptors (Linux /proc)."""
    import os

    out = {"rss_bytes": None, "threads": None, "fds": None}
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_bytes"] = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


def release_free_memory() -> int | None:
    """Returns the heap's free pages to the OS and reports the RSS that is left.

    An execution allocates and frees hundreds of MiB of share buffers. glibc keeps freed
    memory in its arenas (and, after a large free, raises its mmap threshold so the next
    large buffers come from the heap too), so RSS read at an arbitrary moment mixes live
    memory with what an earlier execution left free. ``malloc_trim(0)`` hands that back;
    what remains after it is the figure that shows a leak. None where glibc is absent.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return process_figures()["rss_bytes"]
