"""What a provider watches: ``spu_run status`` and ``Client.status()``.

Aggregate figures only: counts, times, memory, digests. No text, logit or share is ever in
them (node 0 keeps counters, never contents: batching.Stats).

Counters are node 0's since its last start, plus what the service carried over from earlier
node generations (``endpoint.json`` ``carried``, polled every few seconds while serving, so
a restart loses at most the last poll's worth). Latency percentiles cover the current
generation's last answers.
"""

from __future__ import annotations

import time
from pathlib import Path

from mpcformer_jax.private import transport
from mpcformer_jax.private.tls import Identity

_SUMMED = ("answered", "batches", "rows", "padded_rows")


def merge_stats(carried: dict | None, current: dict | None) -> dict:
    """Counters of two node generations added up (latency from the current one)."""
    carried, current = carried or {}, current or {}
    out = {k: int(carried.get(k, 0)) + int(current.get(k, 0)) for k in _SUMMED}
    failed: dict[str, int] = {}
    for part in (carried.get("failed", {}), current.get("failed", {})):
        for code, n in part.items():
            failed[code] = failed.get(code, 0) + int(n)
    out["failed"] = failed
    out["mean_rows_per_batch"] = round(out["rows"] / out["batches"], 3) if out["batches"] \
        else None
    for k in ("latency_p50_s", "latency_p95_s", "latency_window"):
        out[k] = current.get(k)
    return out


def service_status(state_dir: str | Path, ident: Identity, timeout_s: float = 10.0) -> dict:
    """The status of the service whose state folder is ``state_dir``, asked of every node
    with ``ident`` (the owner's or a client's certificate).

    A node that does not answer is reported as such (``"error"``), not raised: a status is
    most needed when something is wrong.
    """
    from mpcformer_jax.private.roles.client import read_endpoint

    endpoint = read_endpoint(state_dir)
    nodes = []
    for node in endpoint["nodes"]:
        ch = transport.channel(node["io"], node["id"], ident)
        try:
            info, _ = transport.unpack(transport.unary(ch, "Info")(b"{}", timeout=timeout_s))
            nodes.append(info)
        except Exception as err:  # grpc.RpcError or a bad frame
            text = transport.error_text(err) if hasattr(err, "code") else str(err)
            nodes.append({"node": node["id"], "error": text})
        finally:
            ch.close()
    leader = nodes[0] if nodes and "error" not in nodes[0] else {}
    started = endpoint.get("started_at")
    return {
        "ready": bool(endpoint.get("ready")) and all("error" not in n for n in nodes),
        "protocol": endpoint.get("protocol"), "fingerprint": endpoint.get("fingerprint"),
        "buckets": endpoint.get("buckets"),
        "uptime_s": round(time.time() - started, 1) if started else None,
        "restarts": endpoint.get("restarts", 0), "generation": endpoint.get("generation"),
        "queue_depth": leader.get("queue_depth"),
        **merge_stats(endpoint.get("carried"), leader.get("stats")),
        "nodes": [{k: n.get(k) for k in _NODE_FIGURES if k in n} for n in nodes],
    }


# Per node, aggregates only. rss_settled_bytes: RSS right after the node's last execution,
# freed memory returned to the OS (the figure that shows a leak).
_NODE_FIGURES = ("node", "pid", "ready", "uptime_s", "rss_bytes", "rss_settled_bytes",
                 "threads", "fds", "served", "queue_depth", "program_digests", "error")


def format_status(status: dict) -> str:
    """The status as a few lines for a terminal."""
    def sec(x):
        return "-" if x is None else f"{x:.2f} s"

    failed = ", ".join(f"{k} {v}" for k, v in sorted(status["failed"].items())) or "none"
    lines = [
        f"{'ready' if status['ready'] else 'NOT READY'}   {status['protocol']}   buckets "
        f"{', '.join(status['buckets'] or [])}   uptime {sec(status['uptime_s'])}   "
        f"restarts {status['restarts']}",
        f"queue depth {status['queue_depth']}   answered {status['answered']}   failed "
        f"{failed}",
        f"batches {status['batches']}   mean rows per batch {status['mean_rows_per_batch']}   "
        f"padded rows {status['padded_rows']}   latency p50 {sec(status['latency_p50_s'])}  "
        f" p95 {sec(status['latency_p95_s'])}"]
    for n in status["nodes"]:
        if "error" in n:
            lines.append(f"  {n['node']}: unreachable ({n['error']})")
            continue
        digest = ",".join(sorted(f"{b}:{d[:12]}" for b, d in n["program_digests"].items()))
        settled = n.get("rss_settled_bytes")
        settled = "-" if settled is None else f"{settled / 2**20:.0f} MiB"
        lines.append(f"  {n['node']}: pid {n['pid']}   RSS {n['rss_bytes'] / 2**20:.0f} MiB "
                     f"(after its last execution {settled})   "
                     f"threads {n['threads']}   fds {n['fds']}   executions {n['served']}   "
                     f"programs {digest}")
    return "\n".join(lines)
