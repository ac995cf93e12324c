"""Benchmark rows from raw records: ratios, latency estimates, JSON, markdown, figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpcformer_jax.bench import network
from mpcformer_jax.bench.measure import CPU_METHOD, extrapolate
from mpcformer_jax.bench.variants import EXACT, FLOOR

GROUPS = ("embedding", "linear", "attention_normaliser", "activation", "layernorm", "other",
          "unattributed")
GIB = 2**30


def _key(r: dict[str, Any]) -> tuple:
    return (r["protocol"], r["shape"], r["variant"], r["layers"],
            json.dumps(r.get("runtime", {}), sort_keys=True),
            json.dumps(r.get("compiler", {}), sort_keys=True))


class Store:
    """Raw records in one JSON file, written after every run so a long sweep can resume."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = json.loads(self.path.read_text()) if self.path.exists() else []

    def find(self, **want) -> dict | None:
        for r in reversed(self.records):
            if all(json.dumps(r.get(k, {}), sort_keys=True) == json.dumps(v, sort_keys=True)
                   if k in ("runtime", "compiler") else r.get(k) == v for k, v in want.items()):
                return r
        return None

    def add(self, record: dict) -> None:
        self.records = [r for r in self.records if _key(r) != _key(record)] + [record]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.records, indent=1))


def full_depth(store: Store, protocol: str, shape, variant: str, **opts) -> dict | None:
    """The record at the shape's full depth: extrapolated from the fit layers when they were
    run (so every variant of a table is obtained the same way), else measured."""
    r1, r2 = (store.find(protocol=protocol, shape=shape.name, variant=variant, layers=n, **opts)
              for n in shape.fit_layers)
    if r1 is not None and r2 is not None and shape.layers not in shape.fit_layers:
        return extrapolate(r1, r2, shape.layers)
    measured = store.find(protocol=protocol, shape=shape.name, variant=variant,
                          layers=shape.layers, **opts)
    return None if measured is None else {**measured, "extrapolated_from": None}


def validation(store: Store, protocol: str, shape, variant: str, **opts) -> dict | None:
    """Measured full depth against the extrapolation: relative error per figure."""
    measured = store.find(protocol=protocol, shape=shape.name, variant=variant,
                          layers=shape.layers, **opts)
    extra = full_depth(store, protocol, shape, variant, **opts)
    if measured is None or extra is None or not extra.get("extrapolated_from"):
        return None
    return {"variant": variant, "protocol": protocol, "shape": shape.name,
            **{k: {"measured": measured.get(k), "extrapolated": extra.get(k)}
               for k in ("bytes", "messages", "wall_s", "cpu_s")}}


def validation_markdown(checks: list[dict]) -> str:
    lines = ["| protocol, shape | variant | GiB measured / extrapolated | messages | "
             "wall s | CPU s (all parties) |", "|---|---|---:|---:|---:|---:|"]

    def pair(d, scale=1.0, fmt="{:.3f}"):
        m, e = d["measured"], d["extrapolated"]
        if m is None or e is None:
            return "-"
        return f"{fmt.format(m / scale)} / {fmt.format(e / scale)}"

    for c in checks:
        lines.append(f"| {c['protocol']}, {c['shape']} | {c['variant']} | "
                     f"{pair(c['bytes'], GIB)} | {pair(c['messages'], fmt='{:,.0f}')} | "
                     f"{pair(c['wall_s'], fmt='{:.1f}')} | {pair(c['cpu_s'], fmt='{:.1f}')} |")
    return "\n".join(lines)


def build_rows(records: list[dict]) -> list[dict]:
    """Adds ratios against exact and the floor and LAN/WAN estimates to full-depth records.

    ``records`` share a protocol and shape. Ratios are of bytes, messages, wall time and
    per-party compute; an ``unattributed`` group holds bytes the profile left out of groups.
    """
    rows = []
    for r in records:
        row = dict(r)
        # Bytes the profile could not put in a group (ops logged under a name the cost
        # parser does not read; 0 since it reads custom calls): shown, not hidden.
        attributed = sum(g["bytes"] for g in r["groups"].values())
        row["groups"] = {**r["groups"], "unattributed": {
            "bytes": max(r["bytes"] - attributed, 0), "messages": 0, "wall_s": 0.0}}
        # Compute of one party: CPU seconds of all parties / parties where measured (robust
        # to other jobs on the cores), else the in-process wall time (an upper bound).
        cpu = r.get("cpu_s") if r.get("cpu_method") == CPU_METHOD else None
        row["compute_s"] = cpu / r["parties"] if cpu else r["wall_s"]
        row["compute_basis"] = "cpu" if cpu else "wall"
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    for row in rows:
        for ref in (EXACT, FLOOR):
            base = by_name.get(ref)
            for k in ("bytes", "messages", "wall_s", "compute_s"):
                row[f"{k}_vs_{ref}"] = row[k] / base[k] if base and base[k] else None
        for net in network.NETWORKS:
            row[net.name] = network.latency(
                net, compute_s=row["compute_s"], bytes_=row["bytes"], messages=row["messages"],
                parties=row["parties"], client_bytes=row["client_bytes"])
    base = by_name.get(EXACT)
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
    """One markdown table: a row per variant; ``*`` marks figures extrapolated over layers."""
    head = ("| variant | wall s | compute s/party | GiB sent | messages | bytes / exact | "
            "bytes / floor | compute / floor | LAN est. s | WAN est. s | LAN speedup | "
            "WAN speedup | max abs diff |")
    lines = [f"**{title}**", "", head, "|---|" + "---:|" * 12]
    for r in rows:
        star = "*" if r.get("extrapolated_from") else ""
        basis = "" if r["compute_basis"] == "cpu" else " (wall)"
        lines.append(
            f"| {r['variant']} | {_wall(r['wall_s'])}{star} | {r['compute_s']:.1f}{star}{basis} | "
            f"{r['bytes'] / GIB:.3f}{star} | {r['messages']:,.0f}{star} | "
            f"{_f(r['bytes_vs_exact'], '{:.3f}')} | {_f(r['bytes_vs_floor'])} | "
            f"{_f(r['compute_s_vs_floor'])} | {r['LAN']['total_s']:.1f} | "
            f"{r['WAN']['total_s']:.1f} | {_f(r['LAN_speedup_vs_exact'])}x | "
            f"{_f(r['WAN_speedup_vs_exact'])}x | {_f(r['max_abs_diff'], '{:.1e}')} |")
    return "\n".join(lines)


def group_table(rows: list[dict]) -> str:
    """Bytes per op group (MiB), a row per variant."""
    lines = ["| variant | " + " | ".join(GROUPS) + " |", "|---|" + "---:|" * len(GROUPS)]
    for r in rows:
        cells = [f"{r['groups'].get(g, {}).get('bytes', 0) / 2**20:,.0f}" for g in GROUPS]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(panels: dict[str, list[dict]], path: str | Path) -> None:
    """Stacked bars of bytes per op group, one bar per variant, one panel per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.4 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, rows) in zip(axes.flat, panels.items(), strict=False):
        names = [r["variant"] for r in rows]
        bottom = [0.0] * len(rows)
        for i, g in enumerate(GROUPS):
            vals = [r["groups"].get(g, {}).get("bytes", 0) / GIB for r in rows]
            ax.bar(names, vals, bottom=bottom, label=g, color=colors[i])
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("GiB sent (all parties)")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Issue 5's targets: (description, protocol, shape, variant, row field, bound, at most?).
TARGETS = (
    ("quad+2quad bytes <= 1.5x the floor", "ABY3", "base-128", "quad+2quad",
     "bytes_vs_floor", 1.5, True),
    ("quad+2quad time (compute) <= 1.1x the floor", "ABY3", "base-128", "quad+2quad",
     "compute_s_vs_floor", 1.1, True),
    ("exact bytes >= 15x quad+2quad", "ABY3", "base-128", "quad+2quad",
     "exact_over", 15.0, False),
    ("LAN speedup vs exact >= 6x at seq 512", "ABY3", "base-512", "quad+2quad",
     "LAN_speedup_vs_exact", 6.0, False),
)


def _target_value(rows: list[dict], variant: str, field: str):
    """(value of ``field`` for ``variant``, its row); "exact_over" is exact's bytes over its."""
    row = next((r for r in rows if r["variant"] == variant), None)
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
    for desc, protocol, shape, variant, field, bound, at_most in TARGETS:
        rows = next((t["rows"] for t in tables
                     if (t["protocol"], t["shape"]) == (protocol, shape)), [])

        value, row = _target_value(rows, variant, field)
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
