"""What cross-client batching buys: concurrent clients against a service with batching on
and off, and the bound batching can reach, all measured in one run.

    uv run python -m experiments.serve_batching runs/default/student
    uv run python -m experiments.serve_batching runs/default/student --clients 1,4 --queries 4

On one machine (ABY3, buckets 1x32 and 8x32):

1. batching on: for each client count, every client sends ``--queries`` one-text queries,
   one after another; texts/s, latency p50/p95, mean rows per execution (from the service's
   own status), and whether every answer is its own text's (each text is unique, and each
   answer is checked against the plaintext forward of that text);
2. batching off (``service.batching: false``, each query in an execution of its own, as
   before issue 17): the same, with ``--queries-off`` queries per client (a queue's rate does
   not change with its length, and the full count would take hours on 2 cores);
3. the bound: one client sending full 8-text queries back to back (8x32 executions).

Ratios printed: batching at 8 clients against the bound and against one client's sequential
rate, and its p95 latency against one full 8x32 execution.

Each measured cell is appended to ``<out>.partial.jsonl`` as it finishes, so an interrupted
run resumes with the cells still missing when the same command is run again. Writes
``<out>.json`` and ``<out>.md``; the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from experiments.serve_benchmark import TEXTS, pct

TOL = 0.05
SUFFIXES = ("quietly", "today", "again", "at last", "for sure", "in the end", "at home",
            "on screen", "in short", "by far", "no doubt", "so far", "as a whole", "of course",
            "all told", "in all", "at best", "at worst", "to me", "for now")


def text_for(client: int, query: int) -> str:
    """A text unique to (client, query) under 32 tokens, so a misdelivered answer shows."""
    return f"{TEXTS[(client + query) % len(TEXTS)]}, {SUFFIXES[query % len(SUFFIXES)]} #{client}"


def expected_logits(model: str, texts: list[str], length: int) -> dict[str, object]:
    from mpcformer_jax.private.model import plaintext_classifier

    logits = plaintext_classifier(model)
    return {t: logits([t], length)[0] for t in texts}


def clients_run(state: str, clients: int, queries: int, expected: dict) -> dict:
    """``clients`` threads, each its own Client, ``queries`` one-text queries each."""
    import numpy as np

    from mpcformer_jax.private import Client

    latencies, errors, wrong = [], [], []
    with Client(state) as watcher:
        before = watcher.status()

    def work(k: int) -> None:
        with Client(state, timeout_s=7200) as client:
            for q in range(queries):
                text = text_for(k, q)
                start = time.perf_counter()
                try:
                    result = client.classify([text])
                except Exception as err:  # counted, not hidden
                    errors.append(f"{type(err).__name__}: {err}")
                    continue
                latencies.append(time.perf_counter() - start)
                got = np.array([p.logits for p in result.predictions])
                if (got.shape != (1, len(expected[text])) or result.predictions[0].text != text
                        or np.abs(got[0] - expected[text]).max() >= TOL):
                    wrong.append(text)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    with Client(state) as watcher:
        after = watcher.status()
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "queries_each": queries, "answered": len(latencies),
            "wrong": len(wrong), "errors": errors[:5], "wall_s": round(wall, 2),
            "texts_per_s": len(latencies) / wall,
            "latency_p50_s": pct(latencies, 0.5) if latencies else None,
            "latency_p95_s": pct(latencies, 0.95) if latencies else None,
            "executions": batches,
            "mean_rows_per_execution": (after["rows"] - before["rows"]) / batches
            if batches else None}


def bound_run(state: str, runs: int) -> dict:
    """One client, full 8-text queries back to back: the rate batching can reach."""
    from mpcformer_jax.private import Client

    with Client(state, timeout_s=7200) as client:
        walls, runs_s = [], []
        for r in range(runs):
            start = time.perf_counter()
            result = client.classify([text_for(r, k) for k in range(8)])
            walls.append(time.perf_counter() - start)
            runs_s.append(result.queries[0]["run_s"])
            assert result.buckets == ["8x32"], result.buckets
    return {"runs": runs, "texts_per_s": 8 * runs / sum(walls),
            "execution_p50_s": pct(walls, 0.5), "mpc_p50_s": pct(runs_s, 0.5)}


def _cells(path: Path) -> dict:
    cells = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # cut by a kill mid-write: measured again
                continue
            cells[row["cell"]] = row
    return cells


def measure(model: str, config: str, counts: list[int], queries: int, queries_off: int,
            bound_runs: int, partial: Path, log) -> dict:
    from mpcformer_jax.private import Service, load_config

    done = _cells(partial)
    texts = [text_for(k, q) for k in range(max(counts)) for q in range(max(queries, 8))]
    expected = expected_logits(model, texts, 32)
    for batching in (True, False):
        todo = [c for c in counts if f"{'on' if batching else 'off'}/{c}" not in done]
        if batching and "bound" not in done:
            todo.append("bound")
        if not todo:
            continue
        data = load_config(config).to_dict()
        data["service"] = {**data.get("service", {}), "batching": batching}
        with tempfile.TemporaryDirectory(prefix="serve_batching_") as state:
            svc = Service(load_config(data), model, state, "1x32,8x32")
            try:
                svc.start()
                from mpcformer_jax.private import Client

                with Client(state) as warm:  # connections and caches
                    warm.classify([TEXTS[0]])
                for c in todo:
                    key = "bound" if c == "bound" else f"{'on' if batching else 'off'}/{c}"
                    log(f"serve_batching: measuring {key}")
                    row = (bound_run(state, bound_runs) if c == "bound" else
                           clients_run(state, c, queries if batching else queries_off,
                                       expected))
                    row = {"cell": key, **row}
                    with partial.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done[key] = row
                    log(f"serve_batching: {json.dumps(row)}")
            finally:
                svc.stop()
    return done


def render(doc: dict) -> str:
    cells = doc["cells"]
    lines = [f"Cross-client batching, {doc['model']}, {doc['protocol']}, buckets 1x32 and "
             f"8x32; one-text queries. Cores: {doc['note']}.", "",
             f"Command: `{doc['command']}`", "",
             "| clients | batching | queries | texts/s | latency p50 | p95 | executions | mean "
             "rows per execution | wrong answers | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("on", "off"):
        for c in doc["counts"]:
            r = cells.get(f"{mode}/{c}")
            if r is None:
                continue
            lines.append(f"| {c} | {mode} | {r['answered']} | {r['texts_per_s']:.3f} | "
                         f"{r['latency_p50_s']:.1f} s | {r['latency_p95_s']:.1f} s | "
                         f"{r['executions']} | {r['mean_rows_per_execution']:.2f} | "
                         f"{r['wrong']} | {len(r['errors'])} |")
    b = cells.get("bound")
    if b:
        lines += ["", f"Bound: full 8x32 executions back to back, {b['texts_per_s']:.3f} "
                  f"texts/s (one execution {b['execution_p50_s']:.1f} s end to end, MPC "
                  f"{b['mpc_p50_s']:.1f} s)."]
    r = doc.get("ratios", {})
    if r:
        lines += ["", "| figure | measured | target |", "|---|---:|---:|"]
        for name, (value, target) in r.items():
            lines.append(f"| {name} | {value:.2f} | {target} |")
    return "\n".join(lines) + "\n"


def ratios(cells: dict) -> dict:
    out = {}
    on8, on1, bound = cells.get("on/8"), cells.get("on/1"), cells.get("bound")
    if on8 and bound:
        out["8 clients, texts/s over the bound"] = (on8["texts_per_s"] / bound["texts_per_s"],
                                                    ">= 0.85")
        out["8 clients, p95 latency over one 8x32 execution"] = (
            on8["latency_p95_s"] / bound["execution_p50_s"], "<= 2.5")
    if on8 and on1:
        out["8 clients, texts/s over one client's sequential rate"] = (
            on8["texts_per_s"] / on1["texts_per_s"], ">= 2.2")
    off8 = cells.get("off/8")
    if on8 and off8:
        out["8 clients, batching on over off (texts/s)"] = (
            on8["texts_per_s"] / off8["texts_per_s"], "")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.serve_batching",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported student folder (runs/default/student)")
    p.add_argument("--config", default="aby3_3pc")
    p.add_argument("--clients", default="1,4,8,16", help="client counts, comma-separated")
    p.add_argument("--queries", type=int, default=20, help="queries per client, batching on")
    p.add_argument("--queries-off", type=int, default=4,
                   help="queries per client, batching off")
    p.add_argument("--bound-runs", type=int, default=5)
    p.add_argument("--note", default="2 cores, alone")
    p.add_argument("--out", default="results/serve_batching")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        print(f"error: {args.model} is not an exported model folder; run "
              "`python -m experiments.distill` first", file=sys.stderr)
        return 2
    try:
        counts = sorted({int(c) for c in args.clients.split(",")})
    except ValueError:
        print(f"error: --clients {args.clients!r}: expected numbers like 1,4,8", file=sys.stderr)
        return 2
    from mpcformer_jax.private import load_config
    from mpcformer_jax.private.runtime import stdout_to_stderr

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.jsonl")
    with stdout_to_stderr():
        cells = measure(args.model, args.config, counts, args.queries, args.queries_off,
                        args.bound_runs, partial,
                        lambda m: print(m, file=sys.stderr, flush=True))
    doc = {"model": args.model, "protocol": load_config(args.config).protocol,
           "note": args.note, "counts": counts,
           "command": "python -m experiments.serve_batching "
           + " ".join(sys.argv[1:] if argv is None else argv),
           "cells": cells, "ratios": ratios(cells)}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
