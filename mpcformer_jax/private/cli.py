"""``spu_run``: classify text privately with an exported student under SPU.

All roles on this machine (three node processes for ABY3, a model-owner process, a client
process; brpc over loopback; ports chosen at launch where the config says 0)::

    spu_run --config spu_configs/aby3_3pc.json --model out/student --text "a gripping film"
    spu_run --config cheetah_2pc --model out/student --input-file reviews.txt --json

One role per host (fixed ports in the config; the same secret SPU_RUN_KEY for every role)::

    spu_run card   --model out/student --out card/                # owner publishes the card
    spu_run node   --rank 0 --config cluster.json                 # on each node host, rank i
    spu_run owner  --config cluster.json --model out/student --batch-size 1 --max-length 32
    spu_run client --config cluster.json --card card/ --text "..." --batch-size 1 --max-length 32

Exit status: 0 on success, 2 with ``spu_run: error: ...`` on stderr otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROLES = ("node", "owner", "client", "card")


def _common(p: argparse.ArgumentParser, shape: bool = True) -> None:
    p.add_argument("--config", required=True,
                   help="cluster config: a JSON path or a name in spu_configs/ (aby3_3pc...)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds any wait may take before the role fails (default: config)")
    if shape:
        p.add_argument("--batch-size", type=int, default=1,
                       help="texts per private forward; owner and client must agree")
        p.add_argument("--max-length", type=int, default=32,
                       help="padded token length; owner and client must agree")


def _texts(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--input-file", help="a file with one text per line")
    p.add_argument("--json", action="store_true", help="print results and costs as JSON")


def build_parser(role: str | None) -> argparse.ArgumentParser:
    """The parser of one role, or of the all-in-one launcher when ``role`` is None."""
    prog = "spu_run" if role is None else f"spu_run {role}"
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if role is None:
        _common(p)
        p.add_argument("--model", required=True, help="exported student folder (or short name)")
        p.add_argument("--attribution", choices=("segments", "ops"), default="segments")
        _texts(p)
    elif role == "node":
        _common(p, shape=False)
        p.add_argument("--rank", type=int, required=True, help="this node's index in the config")
    elif role == "owner":
        _common(p)
        p.add_argument("--model", required=True, help="exported student folder (or short name)")
        p.add_argument("--attribution", choices=("segments", "ops"), default="segments")
    elif role == "client":
        _common(p)
        p.add_argument("--card", required=True,
                       help="the model card folder (config.json + tokenizer; `spu_run card`)")
        _texts(p)
    elif role == "card":
        p.add_argument("--model", required=True, help="exported student folder (or short name)")
        p.add_argument("--out", required=True, help="folder to write the public card to")
    return p


def _cluster(args, fixed_ports: bool):
    from mpcformer_jax.private.config import ConfigError, load_config

    cluster = load_config(args.config)
    if args.timeout is not None:
        if args.timeout <= 0:
            raise ConfigError("--timeout must be positive")
        cluster = dataclasses.replace(cluster, timeout_s=args.timeout)
    if fixed_ports and cluster.needs_ports:
        raise ConfigError(f"{args.config} chooses ports at launch (port 0), which only works when "
                          "spu_run starts every role; for separately started roles write fixed "
                          "ports into a copy of the config")
    return cluster


def _key() -> bytes:
    key = os.environ.get("SPU_RUN_KEY")
    if not key:
        raise ValueError("set SPU_RUN_KEY to the same secret in the environment of every role "
                         "(it authenticates the share transfers), e.g. "
                         "export SPU_RUN_KEY=$(openssl rand -hex 32)")
    return key.encode()


def run_role(role: str | None, args) -> None:
    """Runs the launcher or one role in this process."""
    if role is None:
        from mpcformer_jax.private.launcher import launch_local

        launch_local(_cluster(args, False), args.model, args.text, args.input_file,
                     args.batch_size, args.max_length, args.json, args.attribution)
    elif role == "card":
        from mpcformer_jax.private.roles import export_card

        print(export_card(args.model, args.out))
    elif role == "node":
        from mpcformer_jax.private.cluster import node_main

        cluster = _cluster(args, True)
        if not 0 <= args.rank < cluster.world_size:
            raise ValueError(f"--rank {args.rank} is outside 0..{cluster.world_size - 1}")
        node_main(cluster, args.rank, _key())
    elif role == "owner":
        from mpcformer_jax.private.roles import owner_main

        owner_main(_cluster(args, True), args.model, args.batch_size, args.max_length, _key(),
                   args.attribution)
    elif role == "client":
        from mpcformer_jax.private.roles import client_main

        client_main(_cluster(args, True), args.card, args.text, args.input_file,
                    args.batch_size, args.max_length, _key(), args.json)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    role = argv.pop(0) if argv and argv[0] in ROLES else None
    args = build_parser(role).parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "max_length", 2) < 2:
        print("spu_run: error: --batch-size must be >= 1 and --max-length >= 2", file=sys.stderr)
        return 2
    try:
        run_role(role, args)
    except KeyboardInterrupt:
        print("spu_run: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure ends as one clear line, not a traceback
        from mpcformer_jax.private.launcher import short_error

        print(f"spu_run{'' if role is None else ' ' + role}: error: {short_error(err)}",
              file=sys.stderr)
        if "SPU_RUN_DEBUG" in os.environ:
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
