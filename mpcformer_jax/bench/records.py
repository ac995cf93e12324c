"""A benchmark record: what one private run (or a fit over layers) cost, typed and JSON-ready.

``Record.from_dict`` also reads the dict records written before this type existed (keyed
``variant``, no rounds): their rounds load as None, and the network model then falls back
to messages / parties (see network.py).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mpcformer_jax.approx import Approximation

# How cpu_s was measured; records that used another way do not fit a line with these.
CPU_METHOD = "party_threads"


@dataclasses.dataclass(frozen=True)
class GroupCost:
    """One op group's cost (all parties): bytes and messages sent, rounds, mean party seconds."""

    bytes: float
    messages: float
    rounds: float | None
    wall_s: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupCost:
        return cls(d["bytes"], d["messages"], d.get("rounds"), d["wall_s"])


@dataclasses.dataclass(frozen=True)
class Record:
    """One (approximation, protocol, shape, layers) cost; see measure.measure for the fields.

    ``rounds_method`` says how ``rounds`` was obtained (network.MEASURED, or None for an old
    record without rounds). ``extrapolated_from`` is the two layer counts a fitted record
    came from, None for a measured one.
    """

    approximation: Approximation
    protocol: str
    shape: str
    seq_len: int
    layers: int
    parties: int
    wall_s: float
    bytes: float
    messages: float
    rounds: float | None
    groups: dict[str, GroupCost]
    client_bytes: float = 0.0
    max_abs_diff: float | None = None
    label_agreement: float | None = None
    cpu_s: float | None = None
    cpu_method: str | None = None
    compile_s: float | None = None
    total_s: float | None = None
    rounds_method: str | None = None
    public_table: bool = False
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    compiler: dict[str, Any] = dataclasses.field(default_factory=dict)
    lowering: dict[str, bool] = dataclasses.field(default_factory=dict)  # over LOWERING's
    extrapolated_from: tuple[int, int] | None = None
    warm_queries: int = 0  # queries run first on the same runtimes (a long-lived node's)

    @property
    def label(self) -> str:
        """The approximation's table label ("exact", "floor", or its name)."""
        return self.approximation.label

    def key(self) -> tuple:
        """What identifies a run: a store keeps one record per key."""
        return (self.protocol, self.shape, self.approximation, self.layers, self.public_table,
                json.dumps(self.runtime, sort_keys=True),
                json.dumps(self.compiler, sort_keys=True),
                json.dumps(self.lowering, sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["approximation"] = self.approximation.name
        d["label"] = self.label  # for a reader of the JSON; from_dict ignores it
        if self.extrapolated_from is not None:
            d["extrapolated_from"] = list(self.extrapolated_from)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        """A record from ``to_dict``'s output, or from an old dict record (see module doc)."""
        d = dict(d)
        d.pop("label", None)
        # Old records named the approximation "variant" (its label: "exact", "quad+2quad").
        d["approximation"] = Approximation.parse(d.pop("approximation", None)
                                                 or d.pop("variant"))
        d.pop("variant", None)
        d["groups"] = {g: GroupCost.from_dict(t) for g, t in d["groups"].items()}
        d.setdefault("rounds", None)
        if d.get("extrapolated_from") is not None:
            d["extrapolated_from"] = tuple(d["extrapolated_from"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"record fields not known: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Record:
        return cls.from_dict(json.loads(text))


def extrapolate(r1: Record, r2: Record, layers: int) -> Record:
    """The record at ``layers`` layers from two records at fewer, cost = fixed + per_layer * n.

    Every encoder layer is the same computation on the same shapes, so bytes, messages and
    rounds are exactly linear in the number of layers (the embedding, pooler and classifier
    are the fixed part); wall time is linear up to measurement noise. Group figures are
    extrapolated the same way. A figure missing (None) from either record stays None.
    """
    n1, n2 = r1.layers, r2.layers
    if n1 == n2:
        raise ValueError("extrapolation needs records at two different layer counts")

    def line(a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return None
        return a + (b - a) / (n2 - n1) * (layers - n1)

    same_cpu = r1.cpu_method == r2.cpu_method == CPU_METHOD
    groups = {g: GroupCost(*(line(getattr(r1.groups[g], f.name), getattr(t, f.name))
                             for f in dataclasses.fields(GroupCost)))
              for g, t in r2.groups.items() if g in r1.groups}
    return dataclasses.replace(
        r2, layers=layers, extrapolated_from=(n1, n2), groups=groups,
        wall_s=line(r1.wall_s, r2.wall_s), bytes=line(r1.bytes, r2.bytes),
        messages=line(r1.messages, r2.messages), rounds=line(r1.rounds, r2.rounds),
        # CPU seconds measured two different ways do not fit a line.
        cpu_s=line(r1.cpu_s, r2.cpu_s) if same_cpu else None,
        rounds_method=r2.rounds_method if r1.rounds_method == r2.rounds_method else None)
