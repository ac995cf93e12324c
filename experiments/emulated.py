"""Served latency on an emulated network, measured beside the network model's estimate.

    sudo uv run python -m experiments.emulated runs/default/student --preset lan wan
    uv run python -m experiments.emulated runs/default/student --delay-ms 10 --rate-mbit 1000
    uv run python -m experiments.emulated --bert-base quad+2quad+affine --buckets 1x128 \\
        --preset wan --repeat 1

Every node, the owner and the client run on their own host (a network namespace, see
``mpcformer_jax/bench/netem.py``), deployed as in production: ``spu_run certs``, one
``spu_run node`` per host with fixed ports, ``spu_run serve --remote-nodes``, mutual TLS and
the nodes' TLS tunnels, every connection between hosts through a link with the chosen
one-way delay and rate. Each link is first calibrated (a round trip and a bulk transfer
through it); every result carries that calibration.

For each model and bucket a client on its own host sends one warm-up query, then
``--repeat`` queries of one execution each (rows x length filled with distinct texts), and
reports end-to-end latency: from its call to the answer, shares up and down included. Each
answer is checked against the plaintext forward (largest logit gap).

The estimate beside each figure is bench/network.py's model applied to that run::

    estimate = base + (execution bytes / parties) x 8 / rate + rounds x delay
               + client upload x 8 / rate

with ``base`` the same query's latency measured through the same deployment (the same
processes: one deployment per model is reshaped from link to link, connections kept) with
no delay and no rate limit (``none``: compute, TLS, the service's own coordination), and the
bytes and rounds the execution's own (SPU's counters, private/cost.py). Results go to
``<out>.partial.jsonl`` as each cell finishes (a rerun skips cells already there, so a run
can span sessions) and to ``<out>.json`` / ``<out>.md``. Needs root (namespaces, tc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpcformer_jax.bench.netem import PRESETS, Emulation, Link

CLI = [sys.executable, "-m", "mpcformer_jax.private.cli"]
IO_PORT, LINK_PORT = 7101, 7201
NONE = Link("none", 0.0, None)
WORDS = ("a gripping beautifully shot film dull slow far too long the cast is wonderful but "
         "script lets them down one of most moving films year and triumph for its director "
         "mess charming funny I wanted to leave after ten minutes solid entertainment whole "
         "family").split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cluster_dict(template: str, net: Emulation, timeout_s: float) -> dict:
    """The config ``template`` (a ready config's name or a path) with its nodes on the
    emulation's hosts at fixed ports."""
    from mpcformer_jax.private.config import CONFIG_DIR

    path = Path(template)
    path = path if path.exists() else CONFIG_DIR / f"{template}.json"
    doc = json.loads(path.read_text())
    doc["nodes"] = [{"id": n["id"], "link": f"{net.address(n['id'])}:{LINK_PORT}",
                     "io": f"{net.address(n['id'])}:{IO_PORT}"} for n in doc["nodes"]]
    doc["timeout_s"] = max(doc.get("timeout_s", 60), timeout_s)
    doc.setdefault("link", {}).update(connect_retry_times=240, connect_retry_interval_ms=250)
    doc.setdefault("service", {})["share_wait_s"] = timeout_s
    doc.pop("description", None)
    return doc


def node_ids(template: str) -> list[str]:
    from mpcformer_jax.private.config import load_config

    return [n.id for n in load_config(template).nodes]


class Deployment:
    """The service on an emulation: certs, one ``spu_run node`` per node host, the owner's
    ``spu_run serve --remote-nodes``. ``stop`` ends it through the owner, as an operator
    would (the emulation's close kills whatever is left)."""

    def __init__(self, net: Emulation, model_dir: str, template: str, buckets: str,
                 work: Path, timeout_s: float = 600.0):
        self.net, self.work = net, work
        self.nodes = node_ids(template)
        self.cfg = work / "cluster.json"
        self.cfg.write_text(json.dumps(cluster_dict(template, net, timeout_s), indent=2))
        self.certs, self.state = work / "certs", work / "state"
        subprocess.run(CLI + ["certs", "--out", str(self.certs), "--config", str(self.cfg)],
                       check=True, capture_output=True, timeout=120)
        self.logs = {}
        self.procs = {}
        for rank, n in enumerate(self.nodes):
            self.logs[n] = open(work / f"{n}.log", "w")
            self.procs[n] = net.run(n, CLI + ["node", "--rank", str(rank), "--config",
                                              str(self.cfg), "--certs", str(self.certs)],
                                    stdout=self.logs[n], stderr=subprocess.STDOUT)
        self.logs["owner"] = open(work / "owner.log", "w")
        self.owner = net.run("owner", CLI + ["serve", "--config", str(self.cfg), "--model",
                                             str(model_dir), "--state-dir", str(self.state),
                                             "--certs", str(self.certs), "--remote-nodes",
                                             "--buckets", buckets],
                             stdout=subprocess.PIPE, stderr=self.logs["owner"], text=True)
        line = self.owner.stdout.readline()
        if not line.startswith("ready"):
            self.owner.wait(30)
            raise RuntimeError("the service did not start; owner log:\n"
                               + (work / "owner.log").read_text()[-3000:])

    def query(self, rows: int, length: int, repeat: int, seed: int = 0, warmup: int = 1,
              timeout_s: float = 7200) -> dict:
        """Runs the client driver on the client's host; returns its JSON."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.net.ns("client"), sys.executable, "-m",
             "experiments.emulated", "_client", "--state", str(self.state), "--rows",
             str(rows), "--length", str(length), "--repeat", str(repeat), "--seed", str(seed),
             "--warmup", str(warmup)],
            capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"the client failed: {out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> dict[str, int | None]:
        """Stops the service through its owner; returns each process's exit code (None:
        did not stop within a minute and was killed)."""
        codes: dict[str, int | None] = {}
        for name, proc in [("owner", self.owner), *self.procs.items()]:
            if name == "owner" and proc.poll() is None:
                proc.terminate()  # SIGTERM: the owner stops the remote nodes too
            try:
                codes[name] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                codes[name] = None
        for f in self.logs.values():
            f.close()
        return codes


def texts_for(rows: int, length: int, seed: int) -> list[str]:
    """``rows`` distinct texts that fill ``length`` tokens ([CLS] and [SEP] included)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(rows)]


def client_main(state: str, rows: int, length: int, repeat: int, seed: int,
                warmup: int = 1) -> dict:
    """The client host's part: ``warmup`` untimed queries, then ``repeat`` timed ones."""
    from mpcformer_jax.private import Client

    timings = []
    with Client(state, timeout_s=3600) as client:
        client.connect()  # TLS handshakes with every node: not part of a query's latency
        for k in range(repeat + warmup):
            texts = texts_for(rows, length, seed * 1000 + k)
            t = time.perf_counter()
            result = client.classify(texts)
            wall = time.perf_counter() - t
            q = result.queries
            timings.append({
                "warmup": k < warmup, "latency_s": round(wall, 3), "texts": texts,
                "logits": [p.logits for p in result.predictions],
                "buckets": result.buckets, "executions": len({x["execution"] for x in q}),
                "run_s": round(sum(x["run_s"] for x in q), 3),
                "wait_s": round(max(x["wait_s"] for x in q), 3),
                "bytes": sum(x["execution_bytes"] for x in q),
                "rounds": sum(x["execution_rounds"] for x in q),
                "messages": sum(x["execution_messages"] for x in q),
                "client_bytes": result.cost.input_bytes.get("client", 0)})
    return {"queries": timings}


def estimate(base_s: float, link: Link, parties: int, bytes_: float, rounds: float,
             client_bytes: float) -> dict:
    """bench/network.py's model for this run (see the module docstring)."""
    rate = (link.rate_mbit or float("inf")) * 1e6
    transfer = bytes_ / parties * 8 / rate
    upload = client_bytes * 8 / rate
    rounds_s = rounds * link.delay_ms / 1000
    return {"base_s": round(base_s, 3), "transfer_s": round(transfer, 3),
            "rounds_s": round(rounds_s, 3), "upload_s": round(upload, 4),
            "total_s": round(base_s + transfer + rounds_s + upload, 3)}


def run_model(model_dir: str, label: str, template: str, links: list[Link],
              buckets: list[str], repeat: int, tag: str, warmup: int = 1,
              timeout_s: float = 3600.0, on_cell=lambda cell: None) -> dict:
    """One deployment of ``model_dir``, measured on every link in turn.

    The service starts on the ``none`` link, so the owner's weight upload (a one-time cost,
    not a query's) does not crawl through a slow link; then, per link, the emulation is
    reshaped with every connection kept, calibrated, and each bucket queried. ``warmup``
    untimed queries run per bucket on the first link only: later links find the nodes warm.
    Each link's cell goes to ``on_cell`` as it is done (the caller saves it). Returns the
    cells and every process's exit code once the service stopped (None: killed)."""
    import numpy as np

    from mpcformer_jax.private.config import load_config
    from mpcformer_jax.private.model import plaintext_classifier

    nodes = node_ids(template)
    roles = [*nodes, "owner", "client"]
    ports = {n: [IO_PORT, LINK_PORT] for n in nodes}
    cells = []
    with Emulation(roles, NONE, ports, tag=tag) as net, \
            tempfile.TemporaryDirectory(prefix="emulated_") as work:
        t0 = time.perf_counter()
        dep = Deployment(net, model_dir, template, ",".join(buckets), Path(work), timeout_s)
        log(f"{label}: service up in {time.perf_counter() - t0:.0f} s")
        try:
            protocol = load_config(str(dep.cfg)).protocol
            plain = plaintext_classifier(model_dir)
            for i, link in enumerate(links):
                net.shape(link)
                cell = {"model": label, "protocol": protocol, "link": link.name,
                        "delay_ms": link.delay_ms, "rate_mbit": link.rate_mbit,
                        "calibration": [net.calibrate("client", nodes[0]),
                                        net.calibrate(nodes[0], nodes[1], bulk=False)],
                        "buckets": {}}
                log(f"emulated {link.describe()}: calibration {cell['calibration']}")
                for bucket in buckets:
                    rows, length = (int(x) for x in bucket.split("x"))
                    got = dep.query(rows, length - 2, repeat, warmup=warmup if i == 0 else 0)
                    for q in got["queries"]:
                        expected = plain(q.pop("texts"), length)
                        q["max_logit_gap"] = float(
                            np.abs(expected - np.array(q.pop("logits"))).max())
                    cell["buckets"][bucket] = got["queries"]
                    timed = [q for q in got["queries"] if not q["warmup"]]
                    log(f"  {label} {bucket} on {link.name}: latency "
                        f"{[q['latency_s'] for q in timed]} s, run "
                        f"{[q['run_s'] for q in timed]} s")
                cells.append(cell)
                on_cell(cell)
        finally:
            codes = dep.stop()
            log(f"{label}: service stopped, exit codes {codes}")
    return {"cells": cells, "exit_codes": codes}


def summarize(cells: list[dict], parties_of) -> list[dict]:
    """Per model, bucket and link: the median measured latency beside the estimate."""
    rows = []
    # The base is per protocol too: one output file may hold a model under several protocols.
    base = {(c["model"], c["protocol"], b):
            statistics.median(q["latency_s"] for q in qs if not q["warmup"])
            for c in cells if c["link"] == "none" for b, qs in c["buckets"].items()}
    for c in cells:
        link = Link(c["link"], c["delay_ms"], c["rate_mbit"])
        for b, qs in c["buckets"].items():
            timed = [q for q in qs if not q["warmup"]]
            measured = statistics.median(q["latency_s"] for q in timed)
            row = {"model": c["model"], "protocol": c["protocol"], "bucket": b,
                   "link": c["link"], "delay_ms": c["delay_ms"], "rate_mbit": c["rate_mbit"],
                   "measured_s": round(measured, 3),
                   "run_s": round(statistics.median(q["run_s"] for q in timed), 3),
                   "rounds": timed[0]["rounds"], "bytes": timed[0]["bytes"],
                   # CHEETAH's counted rounds vary between identical queries (its OT
                   # buffers refill now and then): the range says so beside the figure.
                   "rounds_range": [min(q["rounds"] for q in timed),
                                    max(q["rounds"] for q in timed)],
                   "max_logit_gap": round(max(q["max_logit_gap"] for q in qs), 5),
                   "calibration": c["calibration"]}
            if (c["model"], c["protocol"], b) in base and c["link"] != "none":  # none: the base
                est = estimate(base[(c["model"], c["protocol"], b)], link,
                               parties_of(c["protocol"]), timed[0]["bytes"], timed[0]["rounds"],
                               timed[0]["client_bytes"])
                row["estimate"] = est
                row["ratio"] = round(measured / est["total_s"], 3)
                row["rounds_share"] = round(est["rounds_s"] / measured, 3)
            rows.append(row)
    return rows


def to_markdown(rows: list[dict], commands: list[str]) -> str:
    lines = ["# Served latency on an emulated network", "",
             "Commands (each cell is resumable: rerun a command to measure what is missing):",
             "", *[f"- `{c}`" for c in commands], "",
             "Measured: end-to-end latency of one query (median of the timed repeats), "
             "every role on its own host. Estimate: bench/network.py's model with the "
             "same run's bytes and rounds, over the `none` link's measured latency.", "",
             "| model | protocol | bucket | link | measured | estimate | measured / estimate "
             "| rounds (range) | rounds x delay share | RTT measured | rate measured |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cal = r["calibration"][0]
        est = r.get("estimate", {}).get("total_s")
        lines.append(
            f"| {r['model']} | {r['protocol']} | {r['bucket']} | {r['link']} | "
            f"{r['measured_s']:.2f} s | {'-' if est is None else f'{est:.2f} s'} | "
            f"{r.get('ratio', '-')} | {rounds_cell(r)} | {r.get('rounds_share', '-')} | "
            f"{cal['rtt_ms_median']:.2f} ms | "
            f"{cal.get('rate_mbit', '-')} Mbit/s |")
    speed = speedups(rows)
    if speed:
        lines += ["", "Speedup over exact on the same link and bucket, measured (and the "
                  "estimate's):", "", "| model | protocol | bucket | link | measured speedup | "
                  "estimated speedup |", "|---|---|---|---|---:|---:|"]
        lines += [f"| {m} | {proto} | {b} | {link} | {ms:.2f}x | "
                  f"{'-' if es is None else f'{es:.2f}x'} |"
                  for (m, proto, b, link), (ms, es) in speed.items()]
    cross = crossover_ms(rows)
    if cross:
        lines += ["", "Crossover (the one-way delay past which rounds x delay exceeds the rest "
                  "of the no-delay latency): " + ", ".join(
                      f"{m} {proto} {b} {d:.2f} ms"
                      for (m, proto, b), d in sorted(cross.items()))]
    return "\n".join(lines) + "\n"


def rounds_cell(row: dict) -> str:
    """The first timed query's rounds (the estimate's), with the range when queries differ."""
    lo, hi = row.get("rounds_range", [row["rounds"]] * 2)
    return str(row["rounds"]) if lo == hi else f"{row['rounds']} ({lo}-{hi})"


def speedups(rows: list[dict]) -> dict[tuple[str, str, str, str], tuple[float, float | None]]:
    """Per (model, protocol, bucket, link) of a family with an exact member ("bert-base exact" for
    "bert-base quad+2quad"): exact's latency / this model's, measured and estimated."""
    exact = {(r["model"].rsplit(" ", 1)[0], r["protocol"], r["bucket"], r["link"]): r
             for r in rows if r["model"].endswith(" exact")}
    out = {}
    for r in rows:
        ref = exact.get((r["model"].rsplit(" ", 1)[0], r["protocol"], r["bucket"], r["link"]))
        if ref is None or ref is r:
            continue
        est = (ref["estimate"]["total_s"] / r["estimate"]["total_s"]
               if "estimate" in r and "estimate" in ref else None)
        out[(r["model"], r["protocol"], r["bucket"], r["link"])] = (
            ref["measured_s"] / r["measured_s"], est)
    return out


def crossover_ms(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """Per model, protocol and bucket: the one-way delay at which rounds x delay equals the
    rest of the latency on the link with no delay (compute, coordination): past it rounds
    dominate."""
    return {(r["model"], r["protocol"], r["bucket"]):
            round(r["measured_s"] / r["rounds"] * 1000, 3)
            for r in rows if r["link"] == "none" and r["rounds"]}


def plot(rows: list[dict], path: str) -> None:
    """Measured latency (points, solid) and the estimate (dashed) against one-way delay, one
    line per model, bucket and rate; the crossover delay is in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cross = crossover_ms(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shaped = [r for r in rows if r["link"] != "none"]
    series = lambda r: (r["model"], r["protocol"], r["bucket"], r["rate_mbit"] or 0)  # noqa: E731
    for key in sorted({series(r) for r in shaped}):
        mine = sorted((r for r in shaped if series(r) == key), key=lambda r: r["delay_ms"])
        xs = [r["delay_ms"] for r in mine]
        label = f"{key[0]} {key[1]} {key[2]} {key[3]:g} Mbit/s"
        if key[:3] in cross:
            label += f" (crossover {cross[key[:3]]:.1f} ms)"
        line, = ax.plot(xs, [r["measured_s"] for r in mine], "o-", label=label)
        est = [(r["delay_ms"], r["estimate"]["total_s"]) for r in mine if "estimate" in r]
        if est:
            ax.plot(*zip(*est, strict=True), "--", color=line.get_color(), alpha=0.7)
    ax.set_xlabel("one-way delay (ms)")
    ax.set_ylabel("served query latency (s)")
    ax.set_title("Measured (solid) and estimated (dashed) latency, emulated network")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bert_base_folder(variant: str, root: Path, tokenizer_from: str) -> Path:
    """A BERT-base-shaped model of ``variant`` (12 layers, hidden 768) with random weights
    (cost does not depend on them) and the tokenizer of ``tokenizer_from`` (BERT's uncased
    vocabulary in the shipped MiniLM-L6), exported as a student folder."""
    from transformers import AutoTokenizer

    from mpcformer_jax.approx import Approximation
    from mpcformer_jax.models import BertConfig, init_params, save_pretrained
    from mpcformer_jax.models.public_table import mark_public, word_table

    folder = root / f"bert-base-{variant.replace('+', '_')}"
    if (folder / "config.json").exists():
        return folder
    from mpcformer_jax.models.hf_io import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(tokenizer_from))
    config = BertConfig.base(vocab_size=tokenizer.vocab_size).with_approximation(
        Approximation.parse(variant))
    params = init_params(config, 0)
    # The benchmark's setting: the word table is public (here: this folder's own, which the
    # client reads from the shared disk and checks by hash), the client looks tokens up.
    save_pretrained(folder, config, params, tokenizer)
    config = mark_public(config, params, str(folder.resolve()), word_table(params))
    return save_pretrained(folder, config, params, tokenizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.emulated", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="exported model folders (runs/default/student)")
    p.add_argument("--bert-base", nargs="*", default=[], metavar="VARIANT",
                   help="BERT-base-shaped random-weight models of these variants")
    p.add_argument("--tokenizer-from", default="minilm-l6",
                   help="where --bert-base models take their tokenizer (BERT's uncased "
                        "vocabulary; default: the shipped MiniLM-L6)")
    p.add_argument("--config", default="aby3_3pc", help="ready config or path (protocol)")
    p.add_argument("--preset", nargs="*", default=[], choices=sorted(PRESETS))
    p.add_argument("--delay-ms", type=float, nargs="*", default=[],
                   help="free one-way delays (ms), at --rate-mbit")
    p.add_argument("--rate-mbit", type=float, default=None)
    p.add_argument("--buckets", default="1x32,8x32")
    p.add_argument("--repeat", type=int, default=2, help="timed queries per bucket")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed queries per bucket on a deployment's first link (later "
                        "links find the nodes warm)")
    p.add_argument("--timeout-s", type=float, default=3600.0,
                   help="the cluster's bound on every wait, one execution included")
    p.add_argument("--out", default="results/emulated")
    args = p.parse_args(argv)
    rate = args.rate_mbit
    links = [NONE] + [PRESETS[n] for n in args.preset] + [
        Link(f"{d:g}ms" + (f"@{rate:g}Mbit" if rate else ""), d, rate) for d in args.delay_ms]
    models = [(m, Path(m).name if Path(m).name != "student" else str(Path(m).parent.name))
              for m in args.models]
    work = Path("runs/emulated_models")  # weights: never under results/ (tracked)
    for v in args.bert_base:
        models.append((str(bert_base_folder(v, work, args.tokenizer_from)), f"bert-base {v}"))
    if not models:
        p.error("name a model folder or --bert-base VARIANT")
    partial = Path(f"{args.out}.partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in partial.read_text().splitlines()] \
        if partial.exists() else []
    key = lambda c: (c["model"], c["protocol_config"], c["link"], tuple(c["buckets"]))  # noqa: E731
    have = {key(c) for c in done}
    buckets = args.buckets.split(",")

    command = "python -m experiments.emulated " + " ".join(argv or sys.argv[1:])

    def save(cell: dict) -> None:
        cell["protocol_config"] = args.config
        cell["command"] = command
        done.append(cell)
        with partial.open("a") as f:
            f.write(json.dumps(cell) + "\n")

    for model_dir, label in models:
        todo = [link for link in links
                if (label, args.config, link.name, tuple(buckets)) not in have]
        if not todo:
            log(f"have every link of {label}")
            continue
        run_model(model_dir, label, args.config, todo, buckets, args.repeat,
                  tag=f"em{len(done)}", warmup=args.warmup, timeout_s=args.timeout_s,
                  on_cell=save)
    from mpcformer_jax.private.config import load_config

    parties = {c["protocol"]: load_config(c["protocol_config"]).world_size for c in done}
    rows = summarize(done, lambda proto: parties[proto])
    commands = list(dict.fromkeys(c.get("command", command) for c in done))
    Path(f"{args.out}.json").write_text(json.dumps({"commands": commands, "rows": rows},
                                                   indent=2))
    Path(f"{args.out}.md").write_text(to_markdown(rows, commands))
    plot(rows, f"{args.out}.png")
    print(to_markdown(rows, commands))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        cp = argparse.ArgumentParser()
        cp.add_argument("_client")
        cp.add_argument("--state", required=True)
        cp.add_argument("--rows", type=int, required=True)
        cp.add_argument("--length", type=int, required=True)
        cp.add_argument("--repeat", type=int, default=2)
        cp.add_argument("--seed", type=int, default=0)
        cp.add_argument("--warmup", type=int, default=1)
        a = cp.parse_args()
        print(json.dumps(client_main(a.state, a.rows, a.length, a.repeat, a.seed, a.warmup)),
              flush=True)
        sys.exit(0)
    sys.exit(main())
