"""Cost reports parsed from SPU's pphlo profiles.

With ``enable_pphlo_profile`` every party logs, at the end of each executable it runs, a
header ``[Profiling] SPU execution <name> completed ...``, one line per pphlo op name
(count, time, send/recv bytes, send/recv actions) and ``Link details: total send bytes ...``.
SPU counts *messages* (send actions), not rounds. All figures below are summed over parties
unless they say "per party"; a byte is counted once, by its sender.

Rounds (``Traffic.rounds``): every party logs one line per op name per executable, with its
own send actions, so the per-party figures of each op are there even in-process (the lines
carry no rank, but there is exactly one per party). An op's rounds are the most messages any
one party sent in it; ops run one after another on every party, so a run's rounds are the sum
over (executable, op name) of that maximum. How close that is to the true communication depth
is in ``mpcformer_jax/bench/network.py``.

Group attribution: with segmented compilation (compile.py) the executable's name carries its
group (``s007_activation``), so a segment's whole cost goes to that group. With
``attribution="ops"`` (one executable) ops are grouped by pphlo name by ``OP_GROUPS`` below,
which cannot tell a LayerNorm's multiply from a quad activation's, so those land in ``other``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from typing import Any

from mpcformer_jax.private.program import GROUPS

_HEADER = re.compile(r"\[Profiling\] SPU execution (\S+) completed, input processing took "
                     r"\S+s, execution took (\S+)s")
# A custom call logs as "pphlo.custom_call: mhlo.erf" (SPU's native erf): one op name.
_OP = re.compile(r"- (pphlo\.\w+(?:: [\w.]+)?), executed (\d+) times, duration (\S+)s, "
                 r"send bytes (\d+) recv bytes (\d+), send actions (\d+), recv actions (\d+)")
_LINK = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions "
                   r"(\d+), recv actions (\d+)")

# pphlo op name -> group, for attribution="ops" only (see module docstring).
OP_GROUPS = {
    "pphlo.dot": "linear", "pphlo.dot_general": "linear", "pphlo.convolution": "linear",
    "pphlo.exponential": "attention_normaliser", "pphlo.reciprocal": "attention_normaliser",
    "pphlo.divide": "attention_normaliser", "pphlo.maximum": "attention_normaliser",
    "pphlo.rsqrt": "layernorm", "pphlo.sqrt": "layernorm",
    "pphlo.tanh": "activation", "pphlo.custom_call: mhlo.erf": "activation",
    "pphlo.logistic": "activation",
    "pphlo.less": "activation", "pphlo.greater": "activation",
}


@dataclasses.dataclass
class Traffic:
    """Bytes sent, messages sent, (mean per party) seconds, and rounds (see module docstring).

    ``add`` composes two pieces run one after the other, so rounds add up like the rest.
    """

    bytes: int = 0
    messages: int = 0
    time_s: float = 0.0
    rounds: int = 0

    def add(self, other: Traffic) -> None:
        self.bytes += other.bytes
        self.messages += other.messages
        self.time_s += other.time_s
        self.rounds += other.rounds

    def add_party(self, other: Traffic) -> None:
        """Adds another party's figures of the *same* op: the parties run it at the same time,
        so its rounds are the most messages one party sent, not the sum."""
        self.bytes += other.bytes
        self.messages += other.messages
        self.time_s += other.time_s
        self.rounds = max(self.rounds, other.messages)


@dataclasses.dataclass
class PartyTraffic:
    """One party's link totals over a whole run."""

    send_bytes: int = 0
    recv_bytes: int = 0
    send_messages: int = 0
    recv_messages: int = 0


@dataclasses.dataclass
class CostReport:
    """What one private run cost.

    Attributes:
      protocol, world_size: the SPU protocol and its number of compute nodes.
      wall_s: wall time of the private forward on the nodes (all segments, all batches).
      compile_s: time spent compiling (0 when the executables came from the cache).
      share_s: time to secret-share weights and inputs (outside SPU's counters).
      total: bytes and messages sent by all nodes during the forward.
      per_party: link totals per rank; None where SPU 0.9.5 cannot attribute them (the
        in-process threads runner: its log lines carry no rank).
      groups: total per op group (embedding, linear, attention_normaliser, activation,
        layernorm, other).
      ops: total per pphlo op name.
      group_ops: per op group, total per pphlo op name (segmented runs: which ops a group's
        time went to, arithmetic or data movement).
      input_bytes: bytes of the secret shares the owner and client sent into the cluster.
      notes: how figures were obtained.
    """

    protocol: str
    world_size: int
    wall_s: float = 0.0
    compile_s: float = 0.0
    share_s: float = 0.0
    total: Traffic = dataclasses.field(default_factory=Traffic)
    per_party: list[PartyTraffic] | None = None
    groups: dict[str, Traffic] = dataclasses.field(default_factory=dict)
    ops: dict[str, Traffic] = dataclasses.field(default_factory=dict)
    group_ops: dict[str, dict[str, Traffic]] = dataclasses.field(default_factory=dict)
    input_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format(self) -> str:
        """A human-readable table."""
        lines = [f"protocol {self.protocol} ({self.world_size} nodes)   wall {self.wall_s:.2f} s"
                 f"   compile {self.compile_s:.2f} s   sharing {self.share_s:.2f} s",
                 f"total sent: {_mib(self.total.bytes)} in {self.total.messages} messages, "
                 f"{self.total.rounds} rounds"]
        if self.per_party is not None:
            for rank, p in enumerate(self.per_party):
                lines.append(f"  node {rank}: sent {_mib(p.send_bytes)} / {p.send_messages} msgs,"
                             f" received {_mib(p.recv_bytes)} / {p.recv_messages} msgs")
        lines.append(f"{'group':<22}{'sent':>14}{'messages':>10}{'rounds':>8}{'time s':>9}"
                     f"{'share':>8}")
        for name, t in self.groups.items():
            share = t.bytes / self.total.bytes if self.total.bytes else 0.0
            lines.append(f"{name:<22}{_mib(t.bytes):>14}{t.messages:>10}{t.rounds:>8}"
                         f"{t.time_s:>9.3f}{share:>8.1%}")
        for k, v in self.input_bytes.items():
            lines.append(f"input shares from {k}: {_mib(v)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB" if n >= 2**14 else f"{n} B"


def parse_profile(text: str) -> tuple[dict[str, dict[str, Traffic]], list[PartyTraffic], int]:
    """Parses profile lines into per-executable, per-op traffic and per-block link totals.

    Returns ``(by_exe, links, headers)``: ``by_exe[exe_name][op]`` summed over the parties
    that logged it (time divided later; rounds the largest send actions of one line, i.e. of
    one party), ``links`` one entry per logged block in log order, and the number of headers
    seen. Lines of one executable name may interleave across parties (threads share one log);
    callers keep executables apart (a barrier per segment). A log must hold one run of each
    executable: a second run's lines would be taken for more parties (rounds too low).
    """
    by_exe: dict[str, dict[str, Traffic]] = defaultdict(lambda: defaultdict(Traffic))
    links: list[PartyTraffic] = []
    current, headers = "?", 0
    for line in text.splitlines():
        if m := _HEADER.search(line):
            current, headers = m.group(1), headers + 1
        elif m := _OP.search(line):
            by_exe[current][m.group(1)].add_party(Traffic(int(m.group(4)), int(m.group(6)),
                                                          float(m.group(3))))
        elif m := _LINK.search(line):
            links.append(PartyTraffic(*(int(g) for g in m.groups())))
    return by_exe, links, headers


def group_of_exe(exe_name: str) -> str | None:
    """``s007_activation`` -> ``activation``; None for a one-executable run."""
    m = re.fullmatch(r"s\d+_(\w+)", exe_name)
    return m.group(1) if m and m.group(1) in GROUPS else None


def fill_report(report: CostReport, by_exe: dict[str, dict[str, Traffic]],
                parties_logging: int) -> None:
    """Adds parsed traffic to ``report.total/groups/ops``; times become means per party."""
    groups = {g: Traffic() for g in GROUPS}
    for exe, ops in by_exe.items():
        seg_group = group_of_exe(exe)
        for op, t in ops.items():
            t = Traffic(t.bytes, t.messages, t.time_s / max(parties_logging, 1), t.rounds)
            report.ops.setdefault(op, Traffic()).add(t)
            group = seg_group or OP_GROUPS.get(op, "other")
            groups[group].add(t)
            report.group_ops.setdefault(group, {}).setdefault(op, Traffic()).add(t)
            report.total.add(t)
    report.groups = groups


def report_from_profiles(protocol: str, world_size: int, queries: list[list[dict]]
                         ) -> CostReport:
    """A CostReport over queries, each a list of the nodes' profiles (runtime.profile_of):
    per-rank link totals are exact, since every node logs to its own file."""
    report = CostReport(protocol, world_size)
    report.per_party = [PartyTraffic() for _ in range(world_size)]
    by_exe: dict[str, dict[str, Traffic]] = {}
    for profiles in queries:
        report.wall_s += max(p["wall_s"] for p in profiles)
        query: dict[str, dict[str, Traffic]] = {}  # this query's ops, parties merged
        for rank, prof in enumerate(profiles):
            party = report.per_party[rank]
            sb, rb, sm, rm = prof["link"]
            party.send_bytes += sb
            party.recv_bytes += rb
            party.send_messages += sm
            party.recv_messages += rm
            for exe, ops in prof["by_exe"].items():
                for op, (b, m, t) in ops.items():
                    query.setdefault(exe, {}).setdefault(op, Traffic()).add_party(
                        Traffic(b, m, t))
        for exe, ops in query.items():  # queries run one after another: rounds add up
            for op, t in ops.items():
                by_exe.setdefault(exe, {}).setdefault(op, Traffic()).add(t)
    fill_report(report, by_exe, world_size)
    report.total = Traffic(sum(p.send_bytes for p in report.per_party),
                           sum(p.send_messages for p in report.per_party), report.total.time_s,
                           report.total.rounds)
    return report
