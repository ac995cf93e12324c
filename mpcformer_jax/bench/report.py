"""Benchmark rows from Records: ratios, latency estimates, JSON, markdown, figure.

Rows are JSON-ready dicts (a Record's fields plus what is derived from them) and name their
approximation by ``approximation`` (Approximation.name) and ``label`` (its table label).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mpcformer_jax.approx import EXACT, FLOOR, Approximation
from mpcformer_jax.bench import network
from mpcformer_jax.bench.records import CPU_METHOD, Record, extrapolate

GROUPS = ("embedding", "linear", "attention_normaliser", "activation", "layernorm", "other",
          "unattributed")
GIB = 2**30


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class Store:
    """Raw Records in one JSON file, written after every run so a long sweep can resume.

    Reads files written before Records existed (dict records without rounds, see
    records.py); writes every record back in the current format.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = json.loads(self.path.read_text()) if self.path.exists() else []
        self.records: list[Record] = [Record.from_dict(r) for r in raw]

    def find(self, *, protocol: str, shape: str, approximation: Approximation, layers: int,
             runtime: dict | None = None, compiler: dict | None = None,
             public_table: bool = False, lowering: dict | None = None) -> Record | None:
        """The latest record of that run, or None."""
        for r in reversed(self.records):
            if ((r.protocol, r.shape, r.approximation, r.layers, r.public_table)
                    == (protocol, shape, approximation, layers, public_table)
                    and _same(r.runtime, runtime or {}) and _same(r.compiler, compiler or {})
                    and _same(r.lowering, lowering or {})):
                return r
        return None

    def add(self, record: Record) -> None:
        self.records = [r for r in self.records if r.key() != record.key()] + [record]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps([r.to_dict() for r in self.records], indent=1))


def full_depth(store: Store, protocol: str, shape, approximation: Approximation,
               **opts) -> Record | None:
    """The record at the shape's full depth: extrapolated from the fit layers when they were
    run (so every approximation of a table is obtained the same way), else measured."""
    r1, r2 = (store.find(protocol=protocol, shape=shape.name, approximation=approximation,
                         layers=n, **opts) for n in shape.fit_layers_for(approximation))
    if r1 is not None and r2 is not None and \
            shape.layers not in shape.fit_layers_for(approximation):
        return extrapolate(r1, r2, shape.layers)
    measured = store.find(protocol=protocol, shape=shape.name, approximation=approximation,
                          layers=shape.layers, **opts)
    return None if measured is None else dataclasses.replace(measured, extrapolated_from=None)


def table_records(store: Store, protocol: str, shape, approximations, **opts) -> list[Record]:
    """One table's full-depth records, all obtained the same way: the real full-depth runs
    when every approximation has one (``--full-depth``), else ``full_depth`` (extrapolated).

    Bytes, messages and rounds extrapolate exactly (up to the per-party split of rounds);
    compute does not: it is fixed + per_layer * n with per_layer the difference of two short
    runs' CPU seconds, so their noise is multiplied by the layers added (base-128, 5 and 6
    layers to 12: 7x; measured, ``@4:8+linear``'s 12-layer CPU seconds extrapolated to 63.3
    and to 100.8 in two runs whose real 12-layer runs took 78.2 and 78.7). A real run has no
    such factor.
    """
    measured = [store.find(protocol=protocol, shape=shape.name, approximation=a,
                           layers=shape.layers, **opts) for a in approximations]
    if measured and all(measured):
        return [dataclasses.replace(r, extrapolated_from=None) for r in measured]
    return [r for a in approximations if (r := full_depth(store, protocol, shape, a, **opts))]


VALIDATED = ("bytes", "messages", "rounds", "wall_s", "cpu_s")


def validation(store: Store, protocol: str, shape, approximation: Approximation,
               **opts) -> dict | None:
    """Measured full depth against the extrapolation: both values per figure."""
    measured = store.find(protocol=protocol, shape=shape.name, approximation=approximation,
                          layers=shape.layers, **opts)
    extra = full_depth(store, protocol, shape, approximation, **opts)
    if measured is None or extra is None or not extra.extrapolated_from:
        return None
    return {"approximation": approximation.name, "label": approximation.label,
            "protocol": protocol, "shape": shape.name,
            **{k: {"measured": getattr(measured, k), "extrapolated": getattr(extra, k)}
               for k in VALIDATED}}


def validation_markdown(checks: list[dict]) -> str:
    lines = ["| protocol, shape | approximation | GiB measured / extrapolated | messages | "
             "rounds | wall s | CPU s (all parties) |", "|---|---|---:|---:|---:|---:|---:|"]

    def pair(d, scale=1.0, fmt="{:.3f}"):
        m, e = d["measured"], d["extrapolated"]
        if m is None or e is None:
            return "-"
        return f"{fmt.format(m / scale)} / {fmt.format(e / scale)}"

    for c in checks:
        lines.append(f"| {c['protocol']}, {c['shape']} | {c['label']} | "
                     f"{pair(c['bytes'], GIB)} | {pair(c['messages'], fmt='{:,.0f}')} | "
                     f"{pair(c['rounds'], fmt='{:,.0f}')} | "
                     f"{pair(c['wall_s'], fmt='{:.1f}')} | {pair(c['cpu_s'], fmt='{:.1f}')} |")
    return "\n".join(lines)


def row_of(rows: list[dict], approximation: Approximation) -> dict | None:
    """The row of ``approximation`` in a table, or None."""
    return next((r for r in rows
                 if Approximation.parse(r["approximation"]) == approximation), None)


def build_rows(records: list[Record]) -> list[dict]:
    """Full-depth Records (one protocol and shape) -> rows with ratios and LAN/WAN estimates.

    Ratios are of bytes, messages, rounds, wall time and per-party compute, against exact and
    the floor; an ``unattributed`` group holds bytes the profile left out of groups. A record
    without measured rounds (an old one) takes messages / parties, and says so in
    ``rounds_method``.
    """
    rows = []
    for r in records:
        row = r.to_dict()
        measured = r.rounds is not None
        row["rounds"] = r.rounds if measured else network.rounds_from_messages(
            r.messages, r.parties)
        row["rounds_method"] = (r.rounds_method or network.MEASURED) if measured \
            else network.FROM_MESSAGES
        # Bytes the profile could not put in a group (ops logged under a name the cost
        # parser does not read; 0 since it reads custom calls): shown, not hidden. Rounds
        # are summed from the same op lines, so none are left over.
        attributed = sum(g.bytes for g in r.groups.values())
        row["groups"]["unattributed"] = {"bytes": max(r.bytes - attributed, 0), "messages": 0,
                                         "rounds": 0 if measured else None, "wall_s": 0.0}
        # Compute of one party: CPU seconds of all parties / parties where measured (robust
        # to other jobs on the cores), else the in-process wall time (an upper bound).
        cpu = r.cpu_s if r.cpu_method == CPU_METHOD else None
        row["compute_s"] = cpu / r.parties if cpu else r.wall_s
        row["compute_basis"] = "cpu" if cpu else "wall"
        rows.append(row)
    for row in rows:
        for ref in (EXACT, FLOOR):
            base = row_of(rows, ref)
            for k in ("bytes", "messages", "rounds", "wall_s", "compute_s"):
                row[f"{k}_vs_{ref.label}"] = row[k] / base[k] if base and base[k] else None
        for net in network.NETWORKS:
            row[net.name] = network.latency(
                net, compute_s=row["compute_s"], bytes_=row["bytes"], rounds=row["rounds"],
                parties=row["parties"], client_bytes=row["client_bytes"])
    base = row_of(rows, EXACT)
    for row in rows:
        for net in network.NETWORKS:
            row[f"{net.name}_speedup_vs_exact"] = (
                base[net.name]["total_s"] / row[net.name]["total_s"] if base else None)
    return rows


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _wall(x: float) -> str:
    # A wall-time line fitted through two noisy runs can go below zero: say so, not "-12 s".
    return f"{x:.1f}" if x >= 0 else "noise"


def markdown(rows: list[dict], title: str) -> str:
    """One markdown table: a row per approximation; ``*`` marks figures extrapolated over
    layers, ``~`` rounds estimated as messages / parties (a record without measured rounds)."""
    head = ("| approximation | wall s | compute s/party | GiB sent | messages | rounds | "
            "bytes / exact | bytes / floor | rounds / floor | compute / floor | LAN est. s | "
            "WAN est. s | LAN speedup | WAN speedup | max abs diff |")
    lines = [f"**{title}**", "", head, "|---|" + "---:|" * 14]
    for r in rows:
        star = "*" if r.get("extrapolated_from") else ""
        basis = "" if r["compute_basis"] == "cpu" else " (wall)"
        approx_rounds = "~" if r["rounds_method"] == network.FROM_MESSAGES else ""
        lines.append(
            f"| {r['label']} | {_wall(r['wall_s'])}{star} | {r['compute_s']:.1f}{star}{basis} | "
            f"{r['bytes'] / GIB:.3f}{star} | {r['messages']:,.0f}{star} | "
            f"{approx_rounds}{r['rounds']:,.0f}{star} | "
            f"{_f(r['bytes_vs_exact'], '{:.3f}')} | {_f(r['bytes_vs_floor'])} | "
            f"{_f(r['rounds_vs_floor'])} | "
            f"{_f(r['compute_s_vs_floor'])} | {r['LAN']['total_s']:.1f} | "
            f"{r['WAN']['total_s']:.1f} | {_f(r['LAN_speedup_vs_exact'])}x | "
            f"{_f(r['WAN_speedup_vs_exact'])}x | {_f(r['max_abs_diff'], '{:.1e}')} |")
    return "\n".join(lines)


# What a group table or figure panel can show: row field, unit, scale, cell format.
GROUP_FIGURES = {"bytes": ("MiB", 2**20, "{:,.0f}"), "rounds": ("rounds", 1, "{:,.0f}")}


def group_table(rows: list[dict], figure: str = "bytes") -> str:
    """One figure per op group (MiB of bytes, or rounds) and in total, a row per
    approximation; "-" where a record has no per-group rounds (an old record)."""
    _, scale, fmt = GROUP_FIGURES[figure]
    lines = ["| approximation | " + " | ".join(GROUPS) + " | total |",
             "|---|" + "---:|" * (len(GROUPS) + 1)]
    for r in rows:
        vals = [r["groups"].get(g, {}).get(figure, 0) for g in GROUPS]
        cells = [_f(None if v is None else v / scale, fmt) for v in vals]
        total = r[figure] / scale
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {fmt.format(total)} |")
    return "\n".join(lines)


def figure(panels: dict[str, list[dict]], path: str | Path) -> None:
    """Stacked bars per op group, one bar per approximation: for every table a panel of
    bytes and, below it, one of rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(2 * nrows, ncols, figsize=(5.5 * ncols, 8.8 * nrows),
                             squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for i, (title, rows) in enumerate(panels.items()):
        top, col = 2 * (i // ncols), i % ncols
        for ax, (figure_, ylabel, scale) in zip(
                (axes[top][col], axes[top + 1][col]),
                (("bytes", "GiB sent (all parties)", GIB), ("rounds", "rounds", 1)),
                strict=True):
            names = [r["label"] for r in rows]
            bottom = [0.0] * len(rows)
            for j, g in enumerate(GROUPS):
                vals = [(r["groups"].get(g, {}).get(figure_) or 0) / scale for r in rows]
                ax.bar(names, vals, bottom=bottom, label=g, color=colors[j])
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set_title(f"{title}: {figure_}", fontsize=10)
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="x", rotation=45, labelsize=8)
    for k in range(len(panels), nrows * ncols):
        axes[2 * (k // ncols)][k % ncols].set_visible(False)
        axes[2 * (k // ncols) + 1][k % ncols].set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


QUAD_2QUAD = Approximation.parse("quad+2quad")

# Issue 5's targets: (description, protocol, shape, approximation, row field, bound, at most?).
TARGETS = (
    ("quad+2quad bytes <= 1.5x the floor", "ABY3", "base-128", QUAD_2QUAD,
     "bytes_vs_floor", 1.5, True),
    ("quad+2quad time (compute) <= 1.1x the floor", "ABY3", "base-128", QUAD_2QUAD,
     "compute_s_vs_floor", 1.1, True),
    ("exact bytes >= 15x quad+2quad", "ABY3", "base-128", QUAD_2QUAD,
     "exact_over", 15.0, False),
    ("LAN speedup vs exact >= 6x at seq 512", "ABY3", "base-512", QUAD_2QUAD,
     "LAN_speedup_vs_exact", 6.0, False),
)


def _target_value(rows: list[dict], approximation: Approximation, field: str):
    """(value of ``field`` for ``approximation``, its row); "exact_over" is exact's bytes
    over its."""
    row = row_of(rows, approximation)
    if row is None:
        return None, None
    if field == "exact_over":
        ratio = row.get("bytes_vs_exact")
        return (1 / ratio if ratio else None), row
    return row.get(field), row


def check_targets(tables: list[dict]) -> list[dict]:
    """Each target with its measured value and whether it is met (None: not measured).

    ``floor_value`` is the same figure for the linear floor: no approximation can beat it, so
    a ratio target beyond it cannot be met by any approximation on this stack.
    """
    out = []
    for desc, protocol, shape, approximation, field, bound, at_most in TARGETS:
        rows = next((t["rows"] for t in tables
                     if (t["protocol"], t["shape"]) == (protocol, shape)), [])

        value, row = _target_value(rows, approximation, field)
        floor_value, _ = _target_value(rows, FLOOR, field)
        met = None if value is None else (value <= bound if at_most else value >= bound)
        extrapolated = bool(row and row.get("extrapolated_from"))
        out.append({"target": desc, "value": value, "met": met, "extrapolated": extrapolated,
                    "floor_value": floor_value})
    return out


def targets_markdown(results: list[dict]) -> str:
    lines = ["| target | measured | met | the floor's own value (best any approximation "
             "can do) |", "|---|---:|---|---:|"]
    for t in results:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        met = {None: "-", True: "met", False: "not met"}[t["met"]]
        floor = "-" if t.get("floor_value") is None else f"{t['floor_value']:.2f}"
        lines.append(f"| {t['target']} | {value}{'*' if t['extrapolated'] else ''} | {met} "
                     f"| {floor} |")
    return "\n".join(lines)
