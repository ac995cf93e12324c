"""Start the roles of a cluster as processes on this machine and supervise them.

Processes are started with ``spawn`` (forking a process with XLA threads can deadlock), each
asks the kernel to kill it if the launcher dies (``PR_SET_PDEATHSIG``), and the launcher
waits on all of them with a bound: once one role fails, the others get ``timeout_s`` to notice
and exit with their own error, then whatever is left is killed. Nothing outlives the launcher.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing as mp
import multiprocessing.connection
import os
import secrets
import signal
import socket
import sys
import tempfile
import time

import numpy as np

from mpcformer_jax.private.config import ClusterConfig, Node
from mpcformer_jax.private.cost import CostReport


class ClusterError(RuntimeError):
    """A role failed; the message names it and says why."""


def session_key() -> bytes:
    """The frame-authentication key: ``SPU_RUN_KEY`` if set (roles on several hosts must share
    it), else a fresh random key for a launch on this machine."""
    env = os.environ.get("SPU_RUN_KEY")
    return env.encode() if env else secrets.token_bytes(32)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolve_ports(cluster: ClusterConfig) -> ClusterConfig:
    """Replaces every port 0 with a free port of this machine."""
    nodes = [Node(n.id, (n.link[0], n.link[1] or free_port(n.link[0])),
                  (n.io[0], n.io[1] or free_port(n.io[0]))) for n in cluster.nodes]
    return cluster.with_nodes(nodes)


def _die_with_parent(parent: int) -> None:
    # Linux only: SIGKILL this process when its parent exits, whatever the reason.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(3)


def short_error(err: BaseException) -> str:
    """One line for an error; SPU's C++ errors carry a 'what:' prefix and a stack trace."""
    text = str(err).split("stacktrace:")[0].replace("what:", " ")
    return " ".join(text.split()) or type(err).__name__


def _role_entry(role: str, target: str, kwargs: dict, parent: int) -> None:
    _die_with_parent(parent)
    import importlib

    module, name = target.rsplit(":", 1)
    fn = getattr(importlib.import_module(module), name)
    try:
        fn(**kwargs)
    except Exception as err:
        print(f"spu_run {role}: error: {short_error(err)}", file=sys.stderr, flush=True)
        sys.exit(2)


def start_role(role: str, target: str, kwargs: dict) -> mp.Process:
    """Starts ``module:function(**kwargs)`` as a spawned process named ``role``."""
    proc = mp.get_context("spawn").Process(target=_role_entry, name=role,
                                           args=(role, target, kwargs, os.getpid()))
    proc.start()
    return proc


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def supervise(procs: list[mp.Process], timeout_s: float, poll_s: float = 0.2,
              grace_s: float = 5.0) -> None:
    """Waits for every process; after the first failure the rest get ``timeout_s + grace_s``.

    Raises:
      ClusterError: naming the role that failed first (and any that had to be killed).
    """
    failed: list[str] = []
    deadline = None
    alive = list(procs)
    try:
        while alive:
            mp.connection.wait([p.sentinel for p in alive], timeout=poll_s)
            for p in [p for p in alive if not p.is_alive()]:
                alive.remove(p)
                p.join()
                if p.exitcode != 0:
                    failed.append(f"{p.name} {_describe(p.exitcode)}")
                    # The others' own waits end within timeout_s; a margin lets them say why.
                    deadline = deadline or time.monotonic() + timeout_s + grace_s
            if deadline is not None and time.monotonic() > deadline and alive:
                failed += [f"{p.name} did not exit within {timeout_s + grace_s:.0f} s and was "
                           "killed"
                           for p in alive]
                break
    finally:
        stop_all(alive)
    if failed:
        raise ClusterError("; ".join(failed))


def stop_all(procs: list[mp.Process], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; joins every process."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)


def role_specs(cluster: ClusterConfig, model_dir: str, card_dir: str, texts, input_file,
               batch_size: int, max_length: int, key: bytes, as_json: bool,
               attribution: str = "segments") -> dict[str, tuple[str, dict]]:
    """What each role is given: role -> (entry point, kwargs). Only the owner gets the model
    folder; only the client gets the text (or its file) and the public card."""
    specs = {f"node{r}": ("mpcformer_jax.private.cluster:node_main",
                          {"cluster": cluster, "rank": r, "key": key})
             for r in range(cluster.world_size)}
    specs["owner"] = ("mpcformer_jax.private.roles:owner_main",
                      {"cluster": cluster, "model_dir": str(model_dir), "batch_size": batch_size,
                       "max_length": max_length, "key": key, "attribution": attribution})
    specs["client"] = ("mpcformer_jax.private.roles:client_main",
                       {"cluster": cluster, "card_dir": str(card_dir), "texts": texts,
                        "input_file": input_file, "batch_size": batch_size,
                        "max_length": max_length, "key": key, "as_json": as_json})
    return specs


def launch_local(cluster: ClusterConfig, model_dir: str, texts=None, input_file=None,
                 batch_size: int = 1, max_length: int = 32, as_json: bool = False,
                 attribution: str = "segments") -> None:
    """Runs nodes, owner and client as processes on this machine; the client prints results."""
    from mpcformer_jax.private.roles import export_card

    cluster = resolve_ports(cluster)
    key = session_key()
    with tempfile.TemporaryDirectory(prefix="spu_card_") as card:
        export_card(model_dir, card)
        specs = role_specs(cluster, model_dir, card, texts, input_file, batch_size, max_length,
                           key, as_json, attribution)
        procs = []
        try:
            for role, (target, kwargs) in specs.items():
                procs.append(start_role(role, target, kwargs))
            supervise(procs, cluster.timeout_s)
        finally:
            stop_all(procs)


def run_local_nodes(compiled, cluster: ClusterConfig, owner_arrays, client_arrays,
                    timeout_s: float) -> tuple[np.ndarray, CostReport]:
    """Backend of ``api.run(backend="processes")``: node processes, owner and client here."""
    import threading

    from mpcformer_jax.private.cluster import ClientSession, owner_send

    cluster = resolve_ports(cluster)
    cluster = dataclasses.replace(cluster, timeout_s=timeout_s)
    key = secrets.token_bytes(32)
    procs = [start_role(f"node{r}", "mpcformer_jax.private.cluster:node_main",
                        {"cluster": cluster, "rank": r, "key": key})
             for r in range(cluster.world_size)]
    session = None
    try:
        errors, sent = [], []
        owner = threading.Thread(target=_catch, args=(errors, sent, owner_send, cluster,
                                                      compiled, owner_arrays, "local", key))
        owner.start()
        session = ClientSession(cluster, key)
        logits = session.infer(list(compiled.input_names), list(client_arrays.values()), "local")
        owner.join(timeout_s)
        if errors:
            raise ClusterError(f"owner: {errors[0]}")
        report = session.report()
        session.close()
        session = None
        supervise(procs, timeout_s)
        report.notes.append("processes backend: one process per node, brpc over loopback")
        return logits, report
    finally:
        if session is not None:
            session.close(ok=False)
        stop_all(procs)


def _catch(errors: list, results: list, fn, *args) -> None:
    try:
        results.append(fn(*args))
    except Exception as err:
        errors.append(err)
