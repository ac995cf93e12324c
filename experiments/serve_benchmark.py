"""What the service buys: served queries against one-shot ``spu_run``, measured in one run.

    uv run python -m experiments.serve_benchmark runs/default/student
    uv run python -m experiments.serve_benchmark runs/default/student --clients 8 --queries 20

On the same machine, in one run (ABY3, the MiniLM-L6 default student):

1. one-shot ``spu_run`` (start nodes, compile, share the weights, one query, stop) on one text
   at 1x16, end to end, beside the MPC time of its query;
2. a service (``spu_run serve``) with buckets 1x16, 1x32, 8x32: start-up (compile, upload), then
   sequential queries at 1x16, 1x32 and 8x32: end-to-end latency p50/p95 against each query's
   own MPC time (the target: at most 1.2x);
3. throughput: ``--clients`` concurrent clients, ``--queries`` one-text queries each;
4. the tunnels' cost: the same 1x16 query with node <-> node traffic carried by the mutual-TLS
   tunnels against brpc in the clear over loopback TCP (``plain_node_links``, benchmarks only).

Writes results/serve_benchmark.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path("results")
TEXTS = ["a gripping, beautifully shot film", "dull, slow and far too long",
         "the cast is wonderful but the script lets them down",
         "one of the most moving films of the year, and a triumph for its director",
         "a mess", "charming and funny", "I wanted to leave after ten minutes",
         "solid entertainment for the whole family"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def one_shot(model: str, config: str) -> dict:
    """``spu_run`` as one process tree, timed from outside; its JSON gives the MPC time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mpcformer_jax.private.cli", "--config",
                           config, "--model", model, "--max-length", "16", "--json",
                           "--text", TEXTS[0]], capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    doc = json.loads(proc.stdout)
    return {"end_to_end_s": wall, "mpc_s": doc["cost"]["wall_s"],
            "mib": doc["cost"]["total"]["bytes"] / 2**20,
            "messages": doc["cost"]["total"]["messages"],
            "upload_mib": doc["upload"]["bytes"] / 2**20}


def timed_queries(client, texts: list[str], n: int) -> dict:
    """``n`` sequential queries of ``texts``: end-to-end and MPC seconds, bytes, messages."""
    rows = []
    for _ in range(n):
        start = time.perf_counter()
        result = client.classify(texts)
        rows.append((time.perf_counter() - start, result.cost.wall_s, result.cost.total.bytes,
                     result.cost.total.messages, result.buckets[0]))
    e2e, mpc = [r[0] for r in rows], [r[1] for r in rows]
    return {"bucket": rows[0][4], "queries": n, "p50_s": pct(e2e, 0.5), "p95_s": pct(e2e, 0.95),
            "mpc_p50_s": pct(mpc, 0.5),
            "e2e_over_mpc": statistics.median(a / b for a, b in zip(e2e, mpc, strict=True)),
            "mib": rows[0][2] / 2**20, "messages": rows[0][3]}


def throughput(state: str, clients: int, queries: int) -> dict:
    """``clients`` threads, each its own Client, ``queries`` one-text queries each."""
    from mpcformer_jax.private import Client

    latencies, errors = [], []

    def work(k: int) -> None:
        with Client(state, timeout_s=3600) as client:
            for q in range(queries):
                start = time.perf_counter()
                try:
                    client.classify([TEXTS[(k + q) % len(TEXTS)]])
                    latencies.append(time.perf_counter() - start)
                except Exception as err:  # counted, not hidden
                    errors.append(str(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "queries_each": queries, "answered": len(latencies),
            "errors": errors[:5], "wall_s": wall, "texts_per_s": len(latencies) / wall,
            "latency_p50_s": pct(latencies, 0.5) if latencies else None,
            "latency_p95_s": pct(latencies, 0.95) if latencies else None}


def served(model: str, config: str, args, plain: bool = False) -> dict:
    from mpcformer_jax.private import Client, Service, load_config

    with tempfile.TemporaryDirectory(prefix="serve_bench_") as state:
        start = time.perf_counter()
        svc = Service(load_config(config), model, state,
                      "1x16" if plain else "1x16,1x32,8x32", plain_node_links=plain)
        try:
            svc.start()
            startup = time.perf_counter() - start
            out = {"startup_s": startup, "compile_s": svc.owner.compile_s,
                   "upload_mib": sum(svc.upload.bytes_per_node) / 2**20,
                   "upload_s": svc.upload.share_s + svc.upload.send_s}
            with Client(state, timeout_s=3600) as client:
                client.classify(TEXTS[:1])  # first query: connections and caches warm
                out["1x16"] = timed_queries(client, TEXTS[:1], args.repeat)
                if plain:
                    return out
                out["1x32"] = timed_queries(client, [TEXTS[3]], args.repeat)  # 17 tokens
                out["8x32"] = timed_queries(client, TEXTS, max(2, args.repeat // 2))
            if args.clients and args.queries and not args.skip_throughput:
                out["throughput"] = throughput(state, args.clients, args.queries)
            return out
        finally:
            svc.stop()


def served_throughput(model: str, config: str, args) -> dict:
    """A service with the 1x16 and 1x32 buckets, then only the concurrent-clients run."""
    from mpcformer_jax.private import Service, load_config

    with tempfile.TemporaryDirectory(prefix="serve_bench_") as state:
        svc = Service(load_config(config), model, state, "1x16,1x32")
        try:
            svc.start()
            return throughput(state, args.clients, args.queries)
        finally:
            svc.stop()


def render(doc: dict) -> str:
    o, s, p = doc["one_shot"], doc["served"], doc["plain_links"]
    lines = [f"MiniLM-L6 default student, {doc['protocol']}, this machine "
             f"({doc['note']}).", "",
             "| how | bucket | end to end p50 | p95 | MPC p50 | end to end / MPC | MiB | "
             "messages |", "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| one-shot `spu_run` | 1x16 | {o['end_to_end_s']:.1f} s | | {o['mpc_s']:.1f} s | "
             f"{o['end_to_end_s'] / o['mpc_s']:.2f} | {o['mib']:.1f} | {o['messages']:,} |"]
    for b in ("1x16", "1x32", "8x32"):
        r = s[b]
        lines.append(f"| served ({r['queries']} queries) | {b} | {r['p50_s']:.1f} s | "
                     f"{r['p95_s']:.1f} s | {r['mpc_p50_s']:.1f} s | {r['e2e_over_mpc']:.3f} | "
                     f"{r['mib']:.1f} | {r['messages']:,} |")
    r = p["1x16"]
    lines.append(f"| served, node links without TLS tunnels | 1x16 | {r['p50_s']:.1f} s | "
                 f"{r['p95_s']:.1f} s | {r['mpc_p50_s']:.1f} s | {r['e2e_over_mpc']:.3f} | "
                 f"{r['mib']:.1f} | {r['messages']:,} |")
    lines += ["", f"Service start-up {s['startup_s']:.1f} s (compile 3 buckets "
              f"{s['compile_s']:.1f} s, weight shares {s['upload_mib']:.0f} MiB in "
              f"{s['upload_s']:.1f} s), once; one-shot pays all of it on every call "
              f"({o['upload_mib']:.0f} MiB of weight shares per call).",
              f"Served 1x16 against one-shot, end to end: "
              f"{o['end_to_end_s'] / s['1x16']['p50_s']:.2f}x faster.",
              f"TLS tunnels against plaintext brpc, MPC time of a 1x16 query: "
              f"{s['1x16']['mpc_p50_s']:.2f} s vs {r['mpc_p50_s']:.2f} s "
              f"({s['1x16']['mpc_p50_s'] / r['mpc_p50_s'] - 1:+.1%})."]
    t = doc.get("throughput") or s.get("throughput")
    if t:
        lines.append(f"Throughput, {t['clients']} concurrent clients x {t['queries_each']} "
                     f"one-text queries: {t['texts_per_s']:.3f} texts/s, latency p50 "
                     f"{t['latency_p50_s']:.1f} s, p95 {t['latency_p95_s']:.1f} s, "
                     f"{t['answered']} answered, {len(t['errors'])} errors (buckets 1x16 "
                     "and 1x32 only; experiments.serve_batching measures batching).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.serve_benchmark",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported student folder (runs/default/student)")
    p.add_argument("--config", default="aby3_3pc")
    p.add_argument("--repeat", type=int, default=5, help="sequential queries per bucket")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queries", type=int, default=20, help="queries per concurrent client")
    p.add_argument("--note", default="2 cores", help="how the cores were shared, for the table")
    p.add_argument("--throughput-only", action="store_true",
                   help="only the concurrent-clients run, added to the stored results")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        print(f"error: {args.model} is not an exported model folder; run "
              "`python -m experiments.distill` first", file=sys.stderr)
        return 2
    from mpcformer_jax.private import load_config
    from mpcformer_jax.private.runtime import stdout_to_stderr

    if args.throughput_only:
        doc = json.loads((RESULTS / "serve_benchmark.json").read_text())
        with stdout_to_stderr():
            doc["throughput"] = served_throughput(args.model, args.config, args)
        doc["throughput"]["note"] = args.note
        doc["throughput_command"] = ("python -m experiments.serve_benchmark "
                                     + " ".join(sys.argv[1:]))
        (RESULTS / "serve_benchmark.json").write_text(json.dumps(doc, indent=2) + "\n")
        (RESULTS / "serve_benchmark.md").write_text(render(doc))
        print(render(doc))
        return 0
    with stdout_to_stderr():
        doc = {"protocol": load_config(args.config).protocol, "note": args.note,
               "command": "python -m experiments.serve_benchmark " + " ".join(sys.argv[1:]),
               "one_shot": one_shot(args.model, args.config),
               "served": served(args.model, args.config, args),
               "plain_links": served(args.model, args.config, args, plain=True)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_benchmark.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "serve_benchmark.md").write_text(render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
