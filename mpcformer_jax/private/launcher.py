"""Start roles as processes on this machine, and stop them: nothing outlives its starter.

Processes are started with ``spawn`` (forking a process with XLA threads can deadlock) and
each asks the kernel to kill it if its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing as mp
import os
import signal
import socket
import sys
import time

from mpcformer_jax.private.config import ClusterConfig, Node


def check_port_free(host: str, port: int, what: str) -> None:
    """Raises OSError with advice if ``host:port`` cannot be listened on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        taken = err.errno == errno.EADDRINUSE
        raise OSError(f"{what}: port {host}:{port} is "
                      f"{'already in use' if taken else f'not available ({err.strerror})'}; "
                      f"stop the process holding it (`ss -ltnp | grep :{port}`) or choose "
                      "another port in the config (0 = any free port)") from None
    finally:
        sock.close()


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
    os.dup2(2, 1)  # a role's output (SPU's C++ log included) is diagnostics: stderr
    import importlib

    module, name = target.rsplit(":", 1)
    fn = getattr(importlib.import_module(module), name)
    code = 0
    try:
        fn(**kwargs)
    except Exception as err:
        print(f"spu_run {role}: error: {short_error(err)}", file=sys.stderr, flush=True)
        code = 2
    # The role has cleaned up after itself. Leave without the interpreter's finalisation:
    # joining gRPC's worker threads and running brpc's and yacl's destructors can block on a
    # peer that is already gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_role(role: str, target: str, kwargs: dict) -> mp.Process:
    """Starts ``module:function(**kwargs)`` as a spawned process named ``role``."""
    proc = mp.get_context("spawn").Process(target=_role_entry, name=role,
                                           args=(role, target, kwargs, os.getpid()))
    proc.start()
    return proc


def describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


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


