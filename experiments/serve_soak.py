"""A service's long life, measured: many queries from several clients in one lifetime, with
optional faults (a random node SIGKILLed every few minutes, one client gone mid-query).

    uv run python -m experiments.serve_soak runs/default/student --queries 500 --clients 8
    uv run python -m experiments.serve_soak runs/default/student --queries 200 --clients 4 \\
        --kill-every 180 --disconnect-every 25 --out results/serve_faults

Every request is a few texts (1 to ``--max-rows``, of mixed lengths, so several buckets are
used) with a known plaintext answer, computed here on the prepared model. Each is sent until
answered; every error must be a retriable one. The report counts, over all requests:

* lost: never answered;
* duplicated: one request answered twice, or one query id in two answers;
* misdelivered: an answer whose rows are not its own texts' (row count, or logits further
  than 0.05 from the plaintext of its own texts);

and, for each kill, the recovery time: from the kill to the first answer after the service
is ready again. Node memory, threads and file descriptors are sampled from ``status``
after query 50 and at the end (in a run without kills the nodes are the same processes
throughout). The memory compared is each node's settled RSS: read right after its last
execution, once freed memory is returned to the OS.

A node's thread count moves by a few from moment to moment without any leak: SPU's ABY3
matrix product starts a thread per product, and that thread's OpenMP team (Eigen's GEMM)
stays parked for a while after it ends (seen with gdb: 2-3 threads parked in libgomp per
node when idle, some created by the last execution). So threads and descriptors are sampled
``early_samples`` times, every ``early_every`` answers from query 50 on, and as many times
over the last answers (the end's own sample included). The early figure is the largest of the
early samples, the late figure the smallest of the late ones: a leak is a count that stays
above what the node already reached early, at every late sample. One late sample above the
early peak is a parked team, not a leak (seen once in CI: 67 -> 68 with the end compared
alone). Writes ``<out>.json`` and ``<out>.md``; the summary on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

TOL = 0.05
RETRIABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}
WORDS = ("a gripping beautifully shot film dull slow far too long the cast is wonderful but "
         "script lets them down one of most moving films year and triumph for its director "
         "mess charming funny I wanted to leave after ten minutes solid entertainment whole "
         "family").split()


@dataclasses.dataclass
class Request:
    """One logical request: texts, their plaintext logits, and what happened to it."""

    rid: int
    texts: list[str]
    expected: object  # np.ndarray of logits
    answers: list = dataclasses.field(default_factory=list)  # (logits, query ids)
    errors: list[str] = dataclasses.field(default_factory=list)  # gRPC codes seen
    sent: float = 0.0
    done: float = 0.0


def make_requests(n: int, max_rows: int, max_words: int, seed: int, words=WORDS
                  ) -> list[list[str]]:
    """``n`` requests of 1..max_rows texts of 2..max_words random words (mixed lengths)."""
    rng = random.Random(seed)
    return [[" ".join(rng.choice(words) for _ in range(rng.randint(2, max_words)))
             for _ in range(rng.randint(1, max_rows))] for _ in range(n)]


def plaintext_answers(model_dir: str, requests: list[list[str]], lengths: list[int]):
    """The prepared model's plaintext logits for each request, at the length its client
    will pad to (the smallest served length that holds it), as the owner serves it."""
    from mpcformer_jax.private.model import plaintext_classifier

    logits = plaintext_classifier(model_dir)
    out = []
    for texts in requests:
        need = max(len(t) for t in logits.tokenizer(texts)["input_ids"])
        out.append(logits(texts, next((n for n in sorted(lengths) if n >= need),
                                      max(lengths))))
    return out


def soak(state: str, requests: list[Request], clients: int, kill_every_s: float | None = None,
         disconnect_every: int = 0, seed: int = 0, sample_after: int = 50,
         early_samples: int = 6, early_every: int = 10,
         give_up_s: float = 1800.0, max_kills: int | None = None, log=print) -> dict:
    """Runs the requests through the service at ``state`` from ``clients`` threads.

    A request is resent after every retriable error until it is answered, or until it has
    been refused for ``give_up_s`` (then it counts as lost): a service restarting after a
    kill refuses for as long as its recovery takes, which a fixed number of attempts would
    mistake for a loss.

    ``kill_every_s``: SIGKILL a random node (a local service restarts them) this often.
    ``disconnect_every``: every that many requests, one client closes its channels while
    its query is in flight, then sends it again from a fresh client.
    """
    import numpy as np

    from mpcformer_jax.private import Client, QueryError

    todo = list(requests)
    lock = threading.Lock()
    stop = threading.Event()
    kills, samples, fatal = [], {}, []
    answered = [0]
    rng = random.Random(seed)

    def take() -> Request | None:
        with lock:
            return todo.pop(0) if todo else None

    def attempt(client, req: Request, disconnect: bool):
        if not disconnect:
            return client.classify(req.texts)
        box = {}

        def run():
            try:
                box["result"] = client.classify(req.texts)
            except Exception as err:  # the disconnect's own error
                box["error"] = err

        t = threading.Thread(target=run)
        t.start()
        time.sleep(rng.uniform(0.05, 0.5))
        client.close()  # gone mid-query: its calls are cancelled
        t.join(600)
        if "error" in box:
            raise box["error"]
        return box["result"]

    def worker(k: int) -> None:
        client = Client(state, retries=0, timeout_s=3600)
        try:
            while not stop.is_set() and (req := take()) is not None:
                req.sent = time.monotonic()
                with lock:
                    disconnect = bool(disconnect_every) and req.rid % disconnect_every == 1
                n = -1
                while time.monotonic() - req.sent < give_up_s:
                    n += 1
                    try:
                        result = attempt(client, req, disconnect and n == 0)
                    except QueryError as err:
                        req.errors.append(err.code)
                        if err.code not in RETRIABLE:
                            fatal.append(f"request {req.rid}: {err.code}: {err}")
                            break
                        client.close()
                        time.sleep(min(0.5 * (n + 1), 5.0))
                        client = Client(state, retries=0, timeout_s=3600)  # endpoint re-read
                        continue
                    logits = np.array([p.logits for p in result.predictions])
                    req.answers.append((logits, [q["query_id"] for q in result.queries],
                                        result.queries))
                    req.done = time.monotonic()
                    with lock:
                        answered[0] += 1
                        since = answered[0] - sample_after
                        sample = (since >= 0 and since % early_every == 0
                                  and since // early_every < early_samples)
                        left = len(requests) - answered[0]  # the end samples left == 0
                        late = (0 < left < early_samples * early_every
                                and left % early_every == 0 and not sample)
                    if sample or late:
                        figures = _node_figures(client)
                        with lock:
                            if sample:
                                samples.setdefault("early", figures)  # RSS: the first one
                            samples.setdefault("early_window" if sample else "late_window",
                                               []).append(figures)
                    break
                if disconnect:  # the closed client is of no further use
                    client = Client(state, retries=0, timeout_s=3600)
        finally:
            client.close()

    def killer() -> None:
        while not stop.wait(kill_every_s) and len(kills) < (max_kills or 1 << 30):
            try:
                with Client(state, retries=0) as c:
                    nodes = c.info()
                    generation = c.endpoint.get("generation")
            except Exception:  # restarting: try at the next period
                continue
            victim = rng.choice(nodes)
            os.kill(victim["pid"], signal.SIGKILL)
            t = time.monotonic()
            kills.append({"node": victim["node"], "at": t, "generation": generation})
            log(f"soak: killed {victim['node']} (pid {victim['pid']})")

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    kt = threading.Thread(target=killer, daemon=True) if kill_every_s else None
    for t in threads:
        t.start()
    if kt:
        kt.start()
    for t in threads:
        t.join()
    stop.set()
    wall = time.monotonic() - start
    with Client(state, retries=0) as c:
        samples["end"] = _node_figures(c)
        status = c.status()
    return _account(requests, kills, samples, status, wall, fatal)


def _node_figures(client) -> dict:
    status = client.status()
    return {"answered": status["answered"], "nodes": {
        n["node"]: {k: n.get(k) for k in ("pid", "rss_bytes", "rss_settled_bytes", "threads",
                                          "fds")}
        for n in status["nodes"]}}


def _growth(a: dict, b: dict, key: str) -> float | None:
    return round(b[key] / a[key] - 1, 4) if a.get(key) and b.get(key) else None


def _account(requests: list[Request], kills, samples, status, wall, fatal) -> dict:
    import numpy as np

    lost = [r.rid for r in requests if not r.answers]
    qids = [q for r in requests for a in r.answers for q in a[1]]
    duplicated = sum(len(r.answers) > 1 for r in requests) + (len(qids) - len(set(qids)))
    misdelivered = []
    for r in requests:
        for logits, _, _ in r.answers:
            if logits.shape != r.expected.shape or np.abs(logits - r.expected).max() >= TOL:
                misdelivered.append(r.rid)
    gaps = [float(np.abs(a[0] - r.expected).max()) for r in requests for a in r.answers
            if a[0].shape == r.expected.shape]
    done = sorted(r.done for r in requests if r.answers)
    for k in kills:  # the first answer completed after the kill and a restart
        later = [t for t in done if t > k["at"] + 0.5]
        k["recovery_s"] = round(later[0] - k["at"], 2) if later else None
        del k["at"]
    latencies = sorted(r.done - r.sent for r in requests if r.answers)
    errors: dict[str, int] = {}
    for r in requests:
        for e in r.errors:
            errors[e] = errors.get(e, 0) + 1
    execs = {q["execution"] for r in requests for a in r.answers for q in a[2]}
    texts = sum(len(r.texts) for r in requests if r.answers)
    memory = None
    if "early" in samples and samples["end"]:
        a, b = samples["early"]["nodes"], samples["end"]["nodes"]
        window = [w["nodes"] for w in samples.get("early_window") or [samples["early"]]]
        late = [w["nodes"] for w in samples.get("late_window", [])] + [b]

        def most(n, key):  # the largest early count of a node, over the samples that have it
            seen = [w[n][key] for w in window if n in w and w[n].get(key) is not None
                    and w[n]["pid"] == a[n]["pid"]]
            return max(seen) if seen else None

        def least_late(n, key):  # the smallest late count, same process as the end's
            seen = [w[n][key] for w in late if n in w and w[n].get(key) is not None
                    and w[n]["pid"] == b[n]["pid"]]
            return min(seen) if seen else None

        # The settled RSS (right after an execution, freed memory returned to the OS) is the
        # one that shows a leak; RSS at the sampling moment also holds a running execution's
        # buffers, so it is reported beside it.
        memory = {n: {"pid_same": a[n]["pid"] == b[n]["pid"],
                      "rss_growth": _growth(a[n], b[n], "rss_settled_bytes"),
                      "rss_now_growth": _growth(a[n], b[n], "rss_bytes"),
                      "threads": [most(n, "threads"), least_late(n, "threads")],
                      "fds": [most(n, "fds"), least_late(n, "fds")],
                      "threads_early_samples": [w[n]["threads"] for w in window if n in w],
                      "threads_late_samples": [w[n]["threads"] for w in late if n in w]}
                  for n in a if n in b}
    return {"requests": len(requests), "texts": texts, "answered": len(requests) - len(lost),
            "lost": len(lost), "duplicated": duplicated, "misdelivered": len(misdelivered),
            "fatal_errors": fatal[:5], "retriable_errors": errors,
            "max_logit_gap": round(max(gaps), 5) if gaps else None,
            "wall_s": round(wall, 1), "texts_per_s": round(texts / wall, 4),
            "latency_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2)
            if latencies else None,
            "executions_seen": len(execs), "kills": kills, "samples": samples,
            "memory": memory, "service": {k: status.get(k) for k in (
                "restarts", "answered", "failed", "batches", "mean_rows_per_batch",
                "latency_p50_s", "latency_p95_s", "uptime_s")}}


def render(doc: dict) -> str:
    r = doc["result"]
    lines = [f"# Service soak: {doc['model']}, {doc['protocol']}, buckets {doc['buckets']}",
             "", f"Command: `{doc['command']}`", f"Cores: {doc['note']}", "",
             "| requests | texts | answered | lost | duplicated | misdelivered | retriable "
             "errors | kills | restarts | wall | texts/s | latency p50 / p95 |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
             f"| {r['requests']} | {r['texts']} | {r['answered']} | {r['lost']} | "
             f"{r['duplicated']} | {r['misdelivered']} | "
             f"{', '.join(f'{k} {v}' for k, v in sorted(r['retriable_errors'].items())) or '-'}"
             f" | {len(r['kills'])} | {r['service']['restarts']} | {r['wall_s']:.0f} s | "
             f"{r['texts_per_s']:.3f} | {r['latency_p50_s']} / {r['latency_p95_s']} s |", "",
             f"Largest |private - plaintext| logit gap: {r['max_logit_gap']}. Service: "
             f"{r['service']['batches']} executions, {r['service']['mean_rows_per_batch']} "
             "rows each on average."]
    if r["kills"]:
        lines += ["", "Recovery after each kill (kill to the next answer): " + ", ".join(
            f"{k['node']} {k['recovery_s']} s" for k in r["kills"])]
    if r["memory"]:
        pct = lambda x: "-" if x is None else f"{x:+.2%}"  # noqa: E731
        lines += ["", "| node | same process | settled RSS growth, query 50 to the end | "
                  "RSS at the sampling moment | threads (most of queries 50-100 -> fewest of the "
                  "last 50) | fds (the same) |",
                  "|---|---|---:|---:|---|---|"]
        for n, m in r["memory"].items():
            lines.append(f"| {n} | {m['pid_same']} | {pct(m['rss_growth'])} | "
                         f"{pct(m.get('rss_now_growth'))} | "
                         f"{m['threads'][0]} -> {m['threads'][1]} | "
                         f"{m['fds'][0]} -> {m['fds'][1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.serve_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported student folder (runs/default/student)")
    p.add_argument("--config", default="aby3_3pc")
    p.add_argument("--buckets", default="1x16,1x32,8x32,8x64")
    p.add_argument("--queries", type=int, default=500, help="requests in all")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-rows", type=int, default=2, help="texts per request, at most")
    p.add_argument("--max-words", type=int, default=40, help="words per text, at most")
    p.add_argument("--kill-every", type=float, default=None, help="seconds between kills")
    p.add_argument("--disconnect-every", type=int, default=0,
                   help="every N requests, a client leaves mid-query (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="2 cores, alone")
    p.add_argument("--out", default="results/serve_soak", help="output path without suffix")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        print(f"error: {args.model} is not an exported model folder; run "
              "`python -m experiments.distill` first", file=sys.stderr)
        return 2
    from mpcformer_jax.private import Service, load_config
    from mpcformer_jax.private.roles.owner import parse_buckets
    from mpcformer_jax.private.runtime import stdout_to_stderr

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with stdout_to_stderr():
        buckets = parse_buckets(args.buckets)
        texts = make_requests(args.queries, args.max_rows, args.max_words, args.seed)
        expected = plaintext_answers(args.model, texts, [n for _, n in buckets])
        requests = [Request(i, t, e) for i, (t, e) in enumerate(zip(texts, expected,
                                                                    strict=True))]
        cluster = load_config(args.config)
        with tempfile.TemporaryDirectory(prefix="serve_soak_") as state:
            svc = Service(cluster, args.model, state, buckets)
            watcher = threading.Thread(target=_watch, args=(svc,), daemon=True)
            try:
                svc.start()
                watcher.start()
                result = soak(state, requests, args.clients, args.kill_every,
                              args.disconnect_every, args.seed, log=log)
            finally:
                svc.request_stop()
                watcher.join(30)
                svc.stop()
    doc = {"model": args.model, "protocol": cluster.protocol, "buckets": args.buckets,
           "note": args.note, "command": "python -m experiments.serve_soak "
           + " ".join(sys.argv[1:] if argv is None else argv), "result": result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0 if not (result["lost"] or result["duplicated"] or result["misdelivered"]
                     or result["fatal_errors"]) else 1


def _watch(svc) -> None:
    """The service's own watchdog (restarts dead nodes), as ``spu_run serve`` runs it."""
    try:
        svc.wait()
    except Exception as err:  # reported; the soak's queries then fail
        print(f"serve_soak: the service stopped: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
