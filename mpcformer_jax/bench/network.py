"""A network model: end-to-end latency from measured bytes, messages and compute.

    latency = compute + client_upload / bandwidth
              + (bytes / parties) / bandwidth + rounds * one_way_latency

* compute: the measured wall time of the private forward in one process. All parties share
  the benchmark machine's cores there, so it is an upper bound on a deployment where each
  party has its own machine.
* bytes: sent by all parties (SPU's link counters). Every party has its own full-duplex link
  and the protocols here are symmetric up to a small factor, so a party's share of the bytes,
  ``bytes / parties``, crosses its link while the others' cross theirs in parallel.
* rounds: SPU 0.9.5 counts messages ("send actions"), not rounds. Ops run one after the other
  on every party (no inter-op parallelism), so a party's messages lie on the critical path
  one after another; one round is at most one message per party, and a round in which a
  party sends to two peers counts twice. ``rounds = messages / parties`` (messages summed
  over parties) therefore estimates rounds from above.
* client_upload: the client's secret shares of its one-hot tokens and mask, sent once over
  the client's own link before the forward (the weights are shared offline, not counted).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Network:
    """A link: bandwidth in bits per second and one-way latency in seconds."""

    name: str
    bandwidth_bps: float
    latency_s: float


LAN = Network("LAN", 10e9, 0.1e-3)    # 10 Gbps, 0.1 ms
WAN = Network("WAN", 100e6, 40e-3)    # 100 Mbps, 40 ms
NETWORKS = (LAN, WAN)


def rounds(messages: float, parties: int) -> float:
    """Rounds on the critical path, estimated from messages summed over parties (see above)."""
    return messages / parties


def latency(net: Network, *, compute_s: float, bytes_: float, messages: float, parties: int,
            client_bytes: float = 0.0) -> dict[str, float]:
    """Estimated latency of one private forward on ``net``, and its terms.

    Returns a dict with ``compute_s``, ``transfer_s`` (party bytes), ``rounds_s``,
    ``upload_s`` (client shares) and ``total_s``, all in seconds.
    """
    transfer = (bytes_ / parties) * 8 / net.bandwidth_bps
    rounds_s = rounds(messages, parties) * net.latency_s
    upload = client_bytes * 8 / net.bandwidth_bps
    return {"compute_s": compute_s, "transfer_s": transfer, "rounds_s": rounds_s,
            "upload_s": upload, "total_s": compute_s + transfer + rounds_s + upload}
