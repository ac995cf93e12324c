"""A whole test split answered privately, through the service, beside plaintext.

    uv run python -m experiments.private_split runs/default/student            # rt test, ABY3
    uv run python -m experiments.private_split runs/default/student --limit 16 # a quick check
    uv run python -m experiments.private_split --report-only                   # tables only

It starts a local service for the student (``spu_run serve``: nodes, weights shared once, every
bucket compiled once), sends the split as one client would (texts sorted by token length and
sent ``--batch`` at a time, each query in the smallest bucket that fits), and runs the same
forward in plaintext on exactly the inputs the client shared. Every answered query is appended
to ``results/private_split/<name>.jsonl`` at once, so an interrupted run continues where it
stopped when the same command is run again. The summary (private accuracy beside plaintext,
label agreement, largest logit difference, queries and texts per minute) goes to
``results/private_split.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path("results")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write: that query is redone
            pass
    return rows


def plan(lengths: list[int], batch: int) -> list[list[int]]:
    """Queries as lists of example indices: sorted by token length, ``batch`` at a time."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def summarise(rows: list[dict], n_split: int) -> dict:
    """Accuracy, agreement, logit gap and throughput over the answered rows."""
    labels = np.array([y for r in rows for y in r["labels"]])
    private = np.array([np.argmax(x) for r in rows for x in r["private"]])
    plain = np.array([np.argmax(x) for r in rows for x in r["plain"]])
    gap = max((float(np.max(np.abs(np.array(r["private"]) - np.array(r["plain"]))))
               for r in rows), default=0.0)
    wall = sum(r["wall_s"] for r in rows)
    n = len(labels)
    return {"examples": n, "split": n_split, "queries": len(rows),
            "private_acc": float(np.mean(private == labels)) if n else None,
            "plain_acc": float(np.mean(plain == labels)) if n else None,
            "agreement": float(np.mean(private == plain)) if n else None,
            "disagreements": int(np.sum(private != plain)),
            "max_abs_logit_diff": gap, "wall_s": wall,
            "queries_per_min": 60 * len(rows) / wall if wall else None,
            "texts_per_min": 60 * n / wall if wall else None,
            "mib_per_query": np.mean([r["bytes"] for r in rows]) / 2**20 if rows else None,
            "buckets": sorted({r["bucket"] for r in rows})}


def write_report(name: str, summary: dict, meta: dict) -> None:
    """results/private_split.{json,md}: one entry per run name, others kept."""
    path = RESULTS / "private_split.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {**meta, **summary}
    path.write_text(json.dumps(data, indent=2) + "\n")
    lines = ["| run | protocol | examples | plaintext acc | private acc | label agreement | "
             "max logit diff | queries/min | texts/min | MiB/query |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, s in sorted(data.items()):
        done = f"{s['examples']}/{s['split']}"
        lines.append(f"| {key} | {s['protocol']} | {done} | {s['plain_acc']:.4f} | "
                     f"{s['private_acc']:.4f} | {s['agreement']:.2%} "
                     f"({s['disagreements']} differ) | {s['max_abs_logit_diff']:.2e} | "
                     f"{s['queries_per_min']:.2f} | {s['texts_per_min']:.1f} | "
                     f"{s['mib_per_query']:.0f} |")
    (RESULTS / "private_split.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.private_split",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="an exported student folder")
    p.add_argument("--task", default="rt", help="task whose test split is sent (default rt)")
    p.add_argument("--name", default=None, help="run name in the results (default: derived)")
    p.add_argument("--config", default="aby3_3pc", help="cluster config (default aby3_3pc)")
    p.add_argument("--buckets", default="8x32,8x64", help="served buckets")
    p.add_argument("--batch", type=int, default=8, help="texts per query")
    p.add_argument("--limit", type=int, default=None, help="only the first N queries")
    p.add_argument("--query-timeout", type=float, default=300.0,
                   help="seconds one query may take before the service is restarted")
    p.add_argument("--max-restarts", type=int, default=5)
    p.add_argument("--report-only", action="store_true", help="rewrite the tables and stop")
    args = p.parse_args(argv)
    if args.report_only:
        print((RESULTS / "private_split.md").read_text())
        return 0
    if not args.model or not (Path(args.model) / "config.json").exists():
        print(f"error: {args.model!r} is not an exported model folder (config.json missing); "
              "run `python -m experiments.distill` first", file=sys.stderr)
        return 2
    from mpcformer_jax.private.runtime import stdout_to_stderr

    with stdout_to_stderr():  # SPU's C++ log lines must not mix with the JSON summary
        summary = run_split(args)
    print(json.dumps(summary, indent=2))
    return 0


def run_split(args) -> dict:
    import tempfile

    import jax

    from mpcformer_jax.data import load_task
    from mpcformer_jax.models import load_pretrained
    from mpcformer_jax.private import Client, QueryError, Service, load_config
    from mpcformer_jax.private.model import (
        client_table,
        encode_client_inputs,
        prepare,
        reference_forward,
        tokenize,
    )

    name = args.name or f"{Path(args.model).parent.name}_{args.task}_{args.config}"
    out = RESULTS / "private_split" / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    test = load_task(args.task).splits["test"]
    texts, labels = list(test.texts), [int(y) for y in test.labels]
    config, params, tokenizer = load_pretrained(args.model)
    # The plaintext side runs what the service serves (the prepared model) on what the client
    # shares (public-table rows, hash-checked, or one-hot rows).
    cluster = load_config(args.config)
    config, params = prepare(config, params, cluster.protocol)
    table = client_table(config)
    lengths = [len(x) for x in tokenizer(texts, truncation=False)["input_ids"]]
    queries = plan(lengths, args.batch)[:args.limit]
    done = {tuple(r["indices"]) for r in _rows(out)}
    todo = [q for q in queries if tuple(q) not in done]
    print(f"{name}: {len(queries) - len(todo)} of {len(queries)} queries already answered; "
          f"{len(todo)} to go", file=sys.stderr)
    fwd = jax.jit(reference_forward(config))
    with tempfile.TemporaryDirectory(prefix="split_") as state, open(out, "a") as f:
        service, client, restarts, k = None, None, 0, 0
        try:
            while k < len(todo):
                if service is None:
                    service = Service(cluster, args.model, state, args.buckets)
                    service.start()
                    client = Client(state, timeout_s=args.query_timeout, table=table)
                idx = todo[k]
                batch = [texts[i] for i in idx]
                start = time.perf_counter()
                try:
                    result = client.classify(batch)
                except QueryError as err:
                    # A query lost to a failed node (or one stuck past its deadline): start
                    # the service afresh and ask again; answered rows are already on disk.
                    restarts += 1
                    print(f"query {k + 1}/{len(todo)} failed ({err}); restarting the service "
                          f"({restarts}/{args.max_restarts})", file=sys.stderr)
                    client.close()
                    service.stop()
                    service = None
                    if restarts > args.max_restarts:
                        raise
                    continue
                wall = time.perf_counter() - start
                (bucket,) = result.buckets
                b, n = (int(v) for v in bucket.split("x"))
                ids, mask = tokenize(tokenizer, batch + [""] * (b - len(batch)), n)
                plain = np.asarray(fwd(params, *encode_client_inputs(config, ids, mask,
                                                                      table)))
                row = {"indices": idx, "bucket": bucket, "labels": [labels[i] for i in idx],
                       "private": [p.logits for p in result.predictions],
                       "plain": plain[:len(idx)].tolist(), "wall_s": wall,
                       "bytes": result.cost.total.bytes, "messages": result.cost.total.messages}
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"query {k + 1}/{len(todo)} {bucket} {wall:.1f} s", file=sys.stderr)
                k += 1
        finally:
            if client is not None:
                client.close()
            if service is not None:
                service.stop()
    rows = [r for r in _rows(out) if tuple(r["indices"]) in {tuple(q) for q in queries}]
    summary = summarise(rows, len(texts))
    write_report(name, summary, {"protocol": cluster.protocol, "model": str(args.model),
                                 "task": args.task, "batch": args.batch,
                                 "command": "python -m experiments.private_split "
                                            + " ".join(sys.argv[1:])})
    return summary


if __name__ == "__main__":
    sys.exit(main())
