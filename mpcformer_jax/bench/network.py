"""A network model: end-to-end latency from measured bytes, rounds and compute.

    latency = compute + client_upload / bandwidth
              + (bytes / parties) / bandwidth + rounds * one_way_latency

* compute: the measured wall time of the private forward in one process (or the parties'
  CPU seconds / parties, see report.build_rows). All parties share the benchmark machine's
  cores there, so it is an upper bound on a deployment where each party has its own machine.
* bytes: sent by all parties (SPU's link counters). Every party has its own full-duplex link
  and the protocols here are symmetric up to a small factor, so a party's share of the bytes,
  ``bytes / parties``, crosses its link while the others' cross theirs in parallel.
* rounds: measured from SPU's profile (private/cost.py). SPU 0.9.5 counts messages ("send
  actions"), not rounds, but it logs them per party and per op: every party logs one line per
  op name per executable, in-process too (the lines carry no rank, but there is exactly one
  per party, so the maximum over them is the maximum over parties). For an op o with
  ``s_p`` messages sent by party p::

      rounds(o) = max_p s_p,        rounds = sum over executables and op names of rounds(o)

  and a group's rounds are the sum over its segments' ops. How that relates to the true
  communication depth R(o) (the longest chain of messages each waiting for the previous):
    - exact where, in every round of o, each party sends one message (ABY3's reshare, in which
      each party sends to its next party: secret multiplications, matmuls, truncations);
    - over R(o) where a party sends to two peers in one round (an opening to all parties);
    - under R(o) where successive rounds have different senders (a 3-party OT, as in ABY3's
      bit injection, where one party sends and then another);
    - always within ``max_p s_p / (parties - 1) <= R(o) <= sum_p s_p`` (a round is at most one
      message per link and at least one message).
  Summing ops assumes no overlap between consecutive ops; SPU runs ops one after another on
  every party (no inter-op parallelism here), and where a party could start its next op
  before a peer finishes the sum is an upper bound. Messages of one op name executed several
  times in one executable are summed per party before the maximum, which can only lower it.
  Records from before rounds were measured (``rounds`` None) fall back to
  ``messages / parties`` (``rounds_from_messages``), which is at most the measured figure:
  the mean of the parties' messages, where the measured one takes the largest.
* client_upload: the client's secret shares of its inputs, sent once over the client's own
  link before the forward (the weights are shared offline, not counted).
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

# How a record's rounds were obtained (Record.rounds_method).
MEASURED = "max_party_messages_per_op"      # see the module docstring
FROM_MESSAGES = "messages_per_party"         # old records: messages / parties


def rounds_from_messages(messages: float, parties: int) -> float:
    """Rounds of a record without measured rounds: messages (summed over parties) / parties."""
    return messages / parties


def latency(net: Network, *, compute_s: float, bytes_: float, rounds: float, parties: int,
            client_bytes: float = 0.0) -> dict[str, float]:
    """Estimated latency of one private forward on ``net``, and its terms.

    ``rounds`` is the record's measured rounds (see the module docstring). Returns a dict with
    ``compute_s``, ``transfer_s`` (party bytes), ``rounds_s``, ``upload_s`` (client shares)
    and ``total_s``, all in seconds.
    """
    transfer = (bytes_ / parties) * 8 / net.bandwidth_bps
    rounds_s = rounds * net.latency_s
    upload = client_bytes * 8 / net.bandwidth_bps
    return {"compute_s": compute_s, "transfer_s": transfer, "rounds_s": rounds_s,
            "upload_s": upload, "total_s": compute_s + transfer + rounds_s + upload}
