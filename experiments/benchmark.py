"""Cost of every approximation under SPU: time, bytes, messages, rounds, per op group.

    uv run python -m experiments.benchmark --small                       # tiny model, ~1 min
    uv run python -m experiments.benchmark --protocols ABY3 --shapes base-128
    uv run python -m experiments.benchmark --protocols ABY3 SEMI2K --shapes base-128 base-512
    uv run python -m experiments.benchmark --protocols CHEETAH --shapes mini-32 tiny-16
    uv run python -m experiments.benchmark --report-only --protocols ABY3 SEMI2K CHEETAH \
        --shapes base-128 base-512 mini-32 tiny-16                      # tables + figure

Each (protocol, shape, approximation) runs at the shape's ``fit_layers`` (1 and 2 encoder layers)
and is extrapolated linearly to 12 (``--full-depth`` also runs all 12 layers, which is how
the extrapolation was validated; a table whose every row has a full-depth run shows those
runs, ``report.table_records``). Raw records accumulate in ``results/benchmark_raw.json`` (a
rerun skips what is there; ``--force`` redoes it); tables go to ``results/benchmark.md`` and
``results/benchmark.json``, the figure to ``results/benchmark.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mpcformer_jax.bench import report
from mpcformer_jax.bench.measure import measure
from mpcformer_jax.bench.variants import PROTOCOLS, SHAPES, get_variants


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny model at seq 16, ABY3 only")
    p.add_argument("--protocols", nargs="+", default=["ABY3"], choices=PROTOCOLS)
    p.add_argument("--shapes", nargs="+", default=["base-128"], choices=sorted(SHAPES))
    p.add_argument("--variants", nargs="+",
                   help="approximations, e.g. exact quad+2quad floor (default: all listed)")
    p.add_argument("--public-table", action="store_true",
                   help="client sends rows looked up in a public word-embedding table")
    p.add_argument("--full-depth", action="store_true", help="also run all layers for real")
    p.add_argument("--runtime", default="{}", help="JSON RuntimeConfig overrides, all variants")
    p.add_argument("--compiler", default="{}", help="JSON CompilerOptions overrides")
    p.add_argument("--lowering", default="{}",
                   help="JSON overrides of the protocol's lowering (private.model.LOWERING), "
                        'e.g. \'{"block_diagonal_heads": false}\'')
    p.add_argument("--out", default="results", help="results folder")
    p.add_argument("--tag", default="benchmark", help="output file stem")
    p.add_argument("--force", action="store_true", help="rerun records already stored")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.small:
        args.protocols, args.shapes = ["ABY3"], ["tiny-16"]
    # Everything but the approximation, shape and depth that a run is measured under.
    opts = {"runtime": json.loads(args.runtime), "compiler": json.loads(args.compiler),
            "public_table": args.public_table, "lowering": json.loads(args.lowering)}
    out = Path(args.out)
    store = report.Store(out / f"{args.tag}_raw.json")
    try:
        variants = get_variants(args.variants)
    except ValueError as err:  # a misspelt approximation: the valid names, no traceback
        raise SystemExit(f"experiments.benchmark: {err}") from None
    for protocol in args.protocols:
        for shape in (SHAPES[s] for s in args.shapes):
            for variant in variants:
                depths = [*shape.fit_layers_for(variant.approximation),
                          *([shape.layers] if args.full_depth else [])]
                for layers in depths:
                    key = dict(protocol=protocol, shape=shape.name,
                               approximation=variant.approximation, layers=layers, **opts)
                    if args.report_only or (store.find(**key) and not args.force):
                        continue
                    rec = measure(variant, shape, protocol, layers, **opts)
                    store.add(rec)
                    print(f"{protocol} {shape.name} {rec.label} L={layers}: "
                          f"{rec.wall_s:.1f} s, {rec.bytes / 2**30:.3f} GiB, "
                          f"{rec.messages} msgs, {rec.rounds} rounds", flush=True)
    return write_outputs(store, args, variants, opts, out)


def write_outputs(store, args, variants, opts, out: Path) -> list[dict]:
    """Full-depth rows per (protocol, shape) -> JSON, markdown and the figure."""
    tables, panels, md = [], {}, []
    for protocol in args.protocols:
        for shape in (SHAPES[s] for s in args.shapes):
            recs = report.table_records(store, protocol, shape,
                                        [v.approximation for v in variants], **opts)
            if not recs:
                continue
            rows = report.build_rows(recs)
            title = f"{protocol}, {shape.name} ({shape.layers} layers, seq {shape.seq_len})"
            tables.append({"protocol": protocol, "shape": shape.name, "rows": rows})
            panels[title] = rows
            md += [report.markdown(rows, title), "", "Bytes per op group (MiB):", "",
                   report.group_table(rows, "bytes"), "", "Rounds per op group:", "",
                   report.group_table(rows, "rounds"), ""]
    if not tables:
        return []
    checks = [c for protocol in args.protocols for shape in (SHAPES[s] for s in args.shapes)
              for v in variants
              if (c := report.validation(store, protocol, shape, v.approximation, **opts))]
    if checks:
        md += ["Extrapolation check (a real full-depth run against the 1-and-2-layer fit):", "",
               report.validation_markdown(checks), ""]
    md += ["Rounds: per op, the most messages one party sent, summed over ops in order "
           "(mpcformer_jax/bench/network.py says how close that is to the communication "
           "depth); ~ marks a record without them (messages / parties).", ""]
    targets = report.check_targets(tables)
    md += ["Targets of issue 5 (ABY3, BERT-base; * = extrapolated over layers):", "",
           report.targets_markdown(targets), ""]
    (out / f"{args.tag}.json").write_text(json.dumps(
        {"options": opts, "tables": tables, "targets": targets, "validation": checks}, indent=1))
    (out / f"{args.tag}.md").write_text("\n".join(md))
    report.figure(panels, out / f"{args.tag}.png")
    print("\n".join(md))
    return tables


if __name__ == "__main__":
    main()
