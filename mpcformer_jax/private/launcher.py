"""Start roles as processes on this machine, and stop them: nothing outlives its starter.

Processes are started with ``spawn`` (forking a process with XLA threads can deadlock) and
each asks the kernel to kill it if its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

from mpcformer_jax.private.config import ClusterConfig, Node

# A role that could not listen because its port was taken exits with this code, so a launcher
# that chose the port (config port 0) knows to choose again rather than give up.
EXIT_PORT_IN_USE = 4
# Ports chosen at launch are drawn from here up to the kernel's ephemeral range.
_PORT_FLOOR = 20000


class PortInUse(OSError):
    """A role's listening port is taken by another process."""


def check_port_free(host: str, port: int, what: str) -> None:
    """Raises OSError with advice if ``host:port`` cannot be listened on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        taken = err.errno == errno.EADDRINUSE
        raise (PortInUse if taken else OSError)(
            f"{what}: port {host}:{port} is "
            f"{'already in use' if taken else f'not available ({err.strerror})'}; stop the "
            f"process holding it (`ss -ltnp | grep :{port}`) or choose another port in the "
            "config (0 = any free port)") from None
    finally:
        sock.close()


def _bindable(host: str, port: int) -> bool:
    try:
        check_port_free(host, port, "")
    except OSError:
        return False
    return True


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str, avoid: frozenset[int] | set[int] = frozenset()) -> int:
    """A port of ``host`` that is free now, drawn at random below the kernel's ephemeral range.

    A port from ``bind(("", 0))`` is free only until the socket closes; the kernel hands the
    same range to every process's ``bind(0)`` and outgoing connection, and two services
    started at once were given the same ports before their nodes listened on them. A random
    port below that range is taken by neither; what little race is left, the launcher
    survives by choosing again (``EXIT_PORT_IN_USE``).
    """
    top = _ephemeral_floor()
    rng = random.SystemRandom()
    for _ in range(64 if top - _PORT_FLOOR > 1000 else 0):
        port = rng.randrange(_PORT_FLOOR, top)
        if port not in avoid and _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # an odd port range
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolve_ports(cluster: ClusterConfig) -> ClusterConfig:
    """Replaces every port 0 with a free port of this machine, no two the same."""
    chosen: set[int] = set()

    def pick(addr: tuple[str, int]) -> tuple[str, int]:
        if addr[1]:
            return addr
        chosen.add(port := free_port(addr[0], chosen))
        return addr[0], port

    return cluster.with_nodes([Node(n.id, pick(n.link), pick(n.io)) for n in cluster.nodes])


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
        code = EXIT_PORT_IN_USE if isinstance(err, PortInUse) else 2
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


