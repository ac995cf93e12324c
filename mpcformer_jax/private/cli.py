"""``spu_run``: classify text privately with an exported student under SPU.

A service (weights shared once, compiled once per bucket, many queries)::

    spu_run serve --config aby3_3pc --model runs/default/student --state-dir serve/ &
    spu_run query --state-dir serve/ --text "a gripping film" --json
    spu_run status --state-dir serve/ [--json]                 # what the service is doing
    kill %1                                                    # SIGTERM: clean shutdown

One-shot (a service for one query, then stopped)::

    spu_run --config spu_configs/aby3_3pc.json --model out/student --text "a gripping film"

One role per host (fixed ports in the config; certificates from `spu_run certs`)::

    spu_run certs --out certs/ --config cluster.json --host node0=10.0.0.1 ...
    spu_run node  --rank 0 --config cluster.json --certs certs/     # on each node host
    spu_run serve --config cluster.json --model out/student --state-dir serve/ \\
                  --certs certs/ --remote-nodes                     # the owner's host
    spu_run query --state-dir serve/ --text "..."                   # a client with the
                                                                    # endpoint, card, its cert

Every channel is mutual TLS under the service's CA. Results go to stdout (``--json``: one
JSON document, nothing else); logs and SPU's own output go to stderr.
Exit status: 0 on success, 2 with ``spu_run: error: ...`` on stderr otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

COMMANDS = ("serve", "query", "status", "certs", "node", "card")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="cluster config: a JSON path or a name in spu_configs/ (aby3_3pc...)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds any wait may take before it fails (default: the config's)")


def _texts(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--input-file", help="a file with one text per line")
    p.add_argument("--json", action="store_true", help="print results and costs as JSON")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of one command, or of the one-shot run when ``command`` is None."""
    prog = "spu_run" if command is None else f"spu_run {command}"
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if command is None:
        _config_arg(p)
        p.add_argument("--model", required=True, help="exported student folder (or short name)")
        p.add_argument("--batch-size", type=int, default=1, help="texts per private forward")
        p.add_argument("--max-length", type=int, default=32, help="padded token length")
        p.add_argument("--attribution", choices=("segments", "ops"), default="segments")
        _texts(p)
    elif command == "serve":
        _config_arg(p)
        p.add_argument("--model", required=True, help="exported student folder (or short name)")
        p.add_argument("--state-dir", required=True,
                       help="folder for endpoint.json, the public card and (by default) certs")
        p.add_argument("--buckets", default=None,
                       help="BATCHxLENGTH,... compiled once each (default 1x16,1x32,8x32,8x64)")
        p.add_argument("--certs", default=None,
                       help="certificates folder (default: <state-dir>/certs, made if absent)")
        p.add_argument("--remote-nodes", action="store_true",
                       help="the nodes run on other hosts (`spu_run node`); do not start them")
        p.add_argument("--attribution", choices=("segments", "ops"), default="segments")
    elif command == "query":
        p.add_argument("--state-dir", required=True, help="the service's state folder")
        p.add_argument("--name", default="client", help="this client's certificate name")
        p.add_argument("--certs", default=None, help="certificates folder (default: the "
                       "service's)")
        p.add_argument("--timeout", type=float, default=None, help="seconds per query")
        p.add_argument("--verify", action="store_true",
                       help="first recompile the program from the public card and check that "
                            "every node runs exactly it")
        _texts(p)
    elif command == "status":
        p.add_argument("--state-dir", required=True, help="the service's state folder")
        p.add_argument("--name", default="owner",
                       help="whose certificate asks (default: the owner's; a client's works)")
        p.add_argument("--certs", default=None, help="certificates folder (default: the "
                       "service's)")
        p.add_argument("--json", action="store_true", help="print the status as JSON")
    elif command == "certs":
        p.add_argument("--out", required=True, help="folder for the CA, keys and certificates")
        p.add_argument("--config", help="cluster config whose node ids get certificates")
        p.add_argument("--clients", nargs="*", default=["client"], help="client names")
        p.add_argument("--host", action="append", default=[],
                       help="NODE_ID=HOST: an address or DNS name in that node's certificate")
        p.add_argument("--add-client", help="issue one more client certificate with the CA in "
                       "--out")
    elif command == "node":
        _config_arg(p)
        p.add_argument("--rank", type=int, required=True, help="this node's index in the config")
        p.add_argument("--certs", required=True, help="folder holding this node's key + cert")
    elif command == "card":
        p.add_argument("--model", required=True, help="exported student folder (or short name)")
        p.add_argument("--out", required=True, help="folder to write the public card to")
    return p


def _cluster(args, fixed_ports: bool = False):
    from mpcformer_jax.private.config import ConfigError, load_config

    cluster = load_config(args.config)
    if args.timeout is not None:
        if args.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        cluster = dataclasses.replace(cluster, timeout_s=args.timeout)
    if fixed_ports and cluster.needs_ports:
        raise ConfigError(f"{args.config} chooses ports at launch (port 0), which only works when "
                          "spu_run starts every node; for separately started nodes write fixed "
                          "ports into a copy of the config")
    return cluster


def read_texts(texts: list[str] | None, input_file: str | None) -> list[str]:
    """The client's texts: from --text values or one per non-blank line of --input-file."""
    if input_file:
        try:
            texts = [t for t in Path(input_file).read_text().splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read --input-file {input_file}: {err}") from None
    if not texts:
        raise ValueError("no text to classify: pass --text \"...\" or a non-empty --input-file")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"--text number {empty[0] + 1} is empty: there is nothing to classify")
    return texts


def print_results(result, as_json: bool, upload: dict | None = None) -> None:
    """Labels and probabilities (a score for a regression model) and the cost, on stdout."""
    if as_json:
        doc = result.to_dict()
        if upload is not None:
            doc["upload"] = upload
        print(json.dumps(doc, indent=2))
        return
    for p in result.predictions:
        flag = "\t(truncated)" if p.truncated else ""
        if p.label is None:
            print(f"score\t{p.logits[0]:.4f}\t{p.text}{flag}")
        else:
            print(f"{p.label}\t{p.probabilities[p.label]:.3f}\t{p.text}{flag}")
    print(f"buckets {', '.join(result.buckets)}   end to end {result.wall_s:.2f} s")
    for q in result.queries:
        print(f"query: execution {q['execution']} ({q['bucket']}, {q['rows']} of "
              f"{q['rows_used']} rows used, {q['rows_padded']} padded, {q['queries']} "
              f"queries)   waited {q['wait_s']:.2f} s   ran {q['run_s']:.2f} s   its share "
              f"{q['share']:.0%}: {q['bytes'] / 2**20:.3f} MiB, {q['rounds']:.0f} rounds")
    print("executions' totals (every row, other clients' included):")
    print(result.cost.format())


def _one_shot(args) -> None:
    from mpcformer_jax.private.roles.client import Client
    from mpcformer_jax.private.service import Service

    texts = read_texts(args.text, args.input_file)
    if args.batch_size < 1 or args.max_length < 2:
        raise ValueError("--batch-size must be >= 1 and --max-length >= 2")
    with tempfile.TemporaryDirectory(prefix="spu_run_") as state:
        service = Service(_cluster(args), args.model, state,
                          [(args.batch_size, args.max_length)], attribution=args.attribution)
        try:
            service.start()
            with Client(state) as client:
                result = client.classify(texts)
                upload = client.upload
        finally:
            service.stop()
    print_results(result, args.json, upload)


def run_node(cluster, rank: int, ident) -> None:
    """``spu_run node``: the node in a child process, watched by this one.

    SPU's brpc link can end a process abruptly (exit 255, or a segfault) when a peer node
    goes away, even while idle. Watching from outside turns that into one clear line, and the
    node's private folder (its Unix sockets and logs) is removed however the node ended.
    """
    import shutil
    import signal

    from mpcformer_jax.private import launcher

    workdir = Path(tempfile.mkdtemp(prefix="spu_"))
    node = cluster.nodes[rank]
    proc = launcher.start_role(f"node {node.id}", "mpcformer_jax.private.roles.node:node_main",
                               {"cluster": cluster, "rank": rank, "ident": ident,
                                "workdir": str(workdir)})
    forward = lambda signum, frame: proc.is_alive() and os.kill(proc.pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        proc.join()
    finally:
        launcher.stop_all([proc])
        shutil.rmtree(workdir, ignore_errors=True)
    if proc.exitcode not in (0, 2):  # 2: the node already said why on stderr
        raise RuntimeError(f"node {node.id} {launcher.describe(proc.exitcode)}: its MPC link "
                           "failed (did a peer node stop?); restart the nodes, then serve again")
    if proc.exitcode == 2:
        raise RuntimeError(f"node {node.id} stopped (see its error above)")


def run_command(command: str | None, args) -> None:
    """Runs one command in this process."""
    if command is None:
        _one_shot(args)
    elif command == "serve":
        from mpcformer_jax.private.service import DEFAULT_BUCKETS, serve

        serve(_cluster(args, args.remote_nodes), args.model, args.state_dir,
              args.buckets or DEFAULT_BUCKETS, args.certs, args.remote_nodes, args.attribution)
    elif command == "query":
        from mpcformer_jax.private.roles.client import Client

        texts = read_texts(args.text, args.input_file)
        with Client(args.state_dir, args.name, args.certs, args.timeout) as client:
            if args.verify:
                client.verify()
                print("spu_run query: every node runs the program compiled from the card",
                      file=sys.stderr)
                if client.config.public_table_source:
                    print(f"spu_run query: tokens are looked up here in the public table of "
                          f"{client.config.public_table_source} (SHA-256 "
                          f"{client.config.public_table_sha256[:16]}..., checked)",
                          file=sys.stderr)
            print_results(client.classify(texts), args.json)
    elif command == "status":
        from mpcformer_jax.private.roles.client import read_endpoint
        from mpcformer_jax.private.status import format_status, service_status
        from mpcformer_jax.private.tls import identity

        certs = args.certs or read_endpoint(args.state_dir)["certs"]
        status = service_status(args.state_dir, identity(certs, args.name))
        print(json.dumps(status, indent=2) if args.json else format_status(status))
    elif command == "certs":
        from mpcformer_jax.private import tls

        if args.add_client:
            print(tls.issue(args.out, "client", args.add_client).cert)
            return
        if not args.config:
            raise ValueError("pass --config (its node ids get certificates) or --add-client")
        cluster = _cluster(argparse.Namespace(config=args.config, timeout=None))
        hosts: dict[str, tuple[str, ...]] = {}
        for item in args.host:
            node, _, host = item.partition("=")
            if node not in {n.id for n in cluster.nodes} or not host:
                raise ValueError(f"--host {item!r}: expected NODE_ID=HOST with a node id of "
                                 f"the config ({[n.id for n in cluster.nodes]})")
            hosts[node] = (*hosts.get(node, ()), host)
        for n in cluster.nodes:  # the config's own addresses go in by default
            hosts[n.id] = (*hosts.get(n.id, ()), n.io[0], n.link[0])
        print(tls.make_certs(args.out, [n.id for n in cluster.nodes], args.clients, hosts))
    elif command == "node":
        from mpcformer_jax.private.tls import identity

        cluster = _cluster(args, True)
        if not 0 <= args.rank < cluster.world_size:
            raise ValueError(f"--rank {args.rank} is outside 0..{cluster.world_size - 1}")
        run_node(cluster, args.rank, identity(args.certs, cluster.nodes[args.rank].id))
    elif command == "card":
        from mpcformer_jax.private.card import export_card

        print(export_card(args.model, args.out))


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    from mpcformer_jax.private.runtime import stdout_to_stderr

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        with stdout_to_stderr():
            run_command(command, args)
    except KeyboardInterrupt:
        print("spu_run: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure ends as one clear line, not a traceback
        from mpcformer_jax.private.launcher import short_error

        print(f"spu_run{'' if command is None else ' ' + command}: error: {short_error(err)}",
              file=sys.stderr)
        if "SPU_RUN_DEBUG" in os.environ:
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
