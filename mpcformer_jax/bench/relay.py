"""User-space link delay for the emulated network (netem.py), and the probes that calibrate it.

This kernel has no ``netem`` qdisc, so one-way delay is added here: a relay in the switch
namespace accepts every connection addressed to a role's service address, opens the real
connection inside that role's own namespace (``setns`` on the dialling thread), and forwards
each chunk, in order, ``delay`` after it arrived, in both directions. A round trip through it
therefore takes 2 x delay plus the relay's own scheduling (measured by ``probe``). Rates are
the kernel's job (``tbf`` on the veth pairs, netem.py).

It is a split-TCP relay: each side's TCP sees a short hop, so TCP's own window growth over
the delayed path is not emulated. The MPC and gRPC connections here are long-lived, with
autotuned buffers, so they run in that steady state anyway.

    python -m mpcformer_jax.bench.relay relay --delay-ms 40 --route 10.9.1.1:7101=ns-node0 ...
    python -m mpcformer_jax.bench.relay probe-server --listen 10.9.1.1:7999
    python -m mpcformer_jax.bench.relay probe --to 10.9.1.1:7999 --pings 50 --bulk-mb 25

``relay`` prints ``ready`` on stdout once every listener is bound. It then reads commands on
stdin, one per line: ``delay <ms>`` sets the one-way delay of every chunk read from then on
(connections stay up, so one deployment can be measured on several links) and answers ``ok``.
``probe`` prints one JSON line. Everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import signal
import socket
import statistics
import struct
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
CHUNK = 1 << 16
# time.sleep wakes this much late here (measured: 0.09-0.16 ms for 0.5-40 ms sleeps), so the
# writer wakes that much early; calibrate() measures what the round trip then is.
SLEEP_LAG_S = 150e-6
MAX_HELD = 32 << 20  # bytes one direction may hold before its reader waits (backpressure)


def _setns(path: str) -> None:
    """Moves the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def dial_in(netns: str, addr: tuple[str, int], timeout_s: float = 10.0) -> socket.socket:
    """A TCP connection to ``addr`` made inside namespace ``netns``; this thread returns to
    its own namespace afterwards (a socket keeps the namespace it was made in)."""
    home = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    home_fd = os.open(home, os.O_RDONLY)
    try:
        _setns(f"/var/run/netns/{netns}")
        try:
            sock = socket.create_connection(addr, timeout=timeout_s)
        finally:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(home_fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the relay's namespace")
    finally:
        os.close(home_fd)
    sock.settimeout(None)
    return sock


class Direction:
    """One direction of a relayed connection: read, hold each chunk the relay's delay, write."""

    def __init__(self, src: socket.socket, dst: socket.socket, relay: Relay, on_end):
        self.src, self.dst, self.relay, self.on_end = src, dst, relay, on_end
        self.held: collections.deque = collections.deque()
        self.held_bytes = 0
        self.cond = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                with self.cond:
                    while self.held_bytes > MAX_HELD:
                        self.cond.wait()
                    self.held.append((time.monotonic() + self.relay.delay_s, data))
                    self.held_bytes += len(data)
                    self.cond.notify_all()
                if not data:
                    return
        except OSError:
            with self.cond:
                self.held.append((0.0, None))  # reset: end at once
                self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.held:
                        self.cond.wait()
                    due, data = self.held.popleft()
                    self.held_bytes -= len(data or b"")
                    self.cond.notify_all()
                if data is None:
                    break
                wait = due - time.monotonic() - SLEEP_LAG_S
                if wait > 0:
                    time.sleep(wait)
                if not data:  # the sender closed its side: close ours, delay included
                    self.dst.shutdown(socket.SHUT_WR)
                    self.on_end(clean=True)
                    return
                self.dst.sendall(data)
        except OSError:
            pass
        self.on_end(clean=False)


class Relay:
    """Listens on every ``(addr, netns)`` route; each accepted connection is forwarded to the
    same address inside ``netns`` with ``delay_s`` each way (``delay_s`` may change while
    connections are up; a chunk keeps the delay it was read with)."""

    def __init__(self, routes: list[tuple[tuple[str, int], str]], delay_s: float):
        self.routes, self.delay_s = routes, delay_s
        self.listeners: list[socket.socket] = []

    def start(self) -> None:
        for addr, netns in self.routes:
            srv = socket.create_server(addr, reuse_port=False)
            self.listeners.append(srv)
            threading.Thread(target=self._accept, args=(srv, addr, netns), daemon=True).start()

    def _accept(self, srv: socket.socket, addr, netns: str) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = dial_in(netns, addr)
            except OSError as err:
                print(f"relay: {addr[0]}:{addr[1]} in {netns}: {err}", file=sys.stderr,
                      flush=True)
                client.close()
                continue
            self._pipe(client, upstream)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ended = [0]
        lock = threading.Lock()

        def on_end(clean: bool) -> None:
            # Both directions closed cleanly, or one failed: end the connection on both
            # sides (shutdown wakes a reader still blocked in recv).
            with lock:
                ended[0] += 1
                if clean and ended[0] < 2:
                    return
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

        Direction(a, b, self, on_end).start()
        Direction(b, a, self, on_end).start()


# ---------------------------------------------------------------------- probes (calibration)

def probe_server(addr: tuple[str, int]) -> None:
    """Answers probes: ``p`` then one byte echoed per byte; ``b`` + 8-byte length, that many
    bytes consumed, then one byte back."""
    srv = socket.create_server(addr)
    print("ready", flush=True)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            kind = conn.recv(1)
            if kind == b"p":
                while (x := conn.recv(1)):
                    conn.sendall(x)
            elif kind == b"b":
                (n,) = struct.unpack("!Q", _exactly(conn, 8))
                while n > 0:
                    got = conn.recv(min(n, 1 << 20))
                    if not got:
                        return
                    n -= len(got)
                conn.sendall(b"k")

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = conn.recv(n - len(out))
        if not got:
            raise ConnectionError("probe: connection closed early")
        out += got
    return out


def probe(addr: tuple[str, int], pings: int = 50, bulk_bytes: int = 0) -> dict:
    """Round trips of one byte (median, min, max in ms) and, with ``bulk_bytes``, the rate
    of one bulk transfer: bytes / (time to the receiver's ack - one round trip)."""
    out: dict = {}
    with socket.create_connection(addr, timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"p")
        rtts = []
        for _ in range(pings + 3):
            t = time.perf_counter()
            s.sendall(b"x")
            _exactly(s, 1)
            rtts.append((time.perf_counter() - t) * 1000)
        rtts = rtts[3:]  # the first trips open the relay's path
        out.update(rtt_ms_median=round(statistics.median(rtts), 3),
                   rtt_ms_min=round(min(rtts), 3), rtt_ms_max=round(max(rtts), 3),
                   pings=pings)
    if bulk_bytes:
        with socket.create_connection(addr, timeout=60) as s:
            s.sendall(b"b" + struct.pack("!Q", bulk_bytes))
            block = os.urandom(1 << 20)
            t = time.perf_counter()
            left = bulk_bytes
            while left > 0:
                s.sendall(block[:min(left, len(block))])
                left -= min(left, len(block))
            _exactly(s, 1)
            elapsed = time.perf_counter() - t
        transfer = max(elapsed - out["rtt_ms_median"] / 1000, 1e-9)
        out.update(bulk_bytes=bulk_bytes, bulk_s=round(elapsed, 3),
                   rate_mbit=round(bulk_bytes * 8 / transfer / 1e6, 2))
    return out


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpcformer_jax.bench.relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    r.add_argument("--route", action="append", default=[], metavar="HOST:PORT=NETNS")
    s = sub.add_parser("probe-server")
    s.add_argument("--listen", required=True, metavar="HOST:PORT")
    c = sub.add_parser("probe")
    c.add_argument("--to", required=True, metavar="HOST:PORT")
    c.add_argument("--pings", type=int, default=50)
    c.add_argument("--bulk-mb", type=float, default=0.0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    if args.cmd == "relay":
        # Many threads, mostly blocked in I/O; a chunk whose time is up should not wait the
        # default 5 ms for the GIL to change hands.
        sys.setswitchinterval(1e-4)
        routes = []
        for text in args.route:
            addr, _, netns = text.partition("=")
            routes.append((_addr(addr), netns))
        relay = Relay(routes, args.delay_ms / 1000)
        relay.start()
        print("ready", flush=True)
        for line in sys.stdin:  # commands; EOF (the emulation gone) ends the relay
            cmd = line.split()
            if len(cmd) == 2 and cmd[0] == "delay":
                relay.delay_s = float(cmd[1]) / 1000
                print("ok", flush=True)
            elif cmd:
                print(f"error: unknown command {line.strip()!r} (known: delay <ms>)",
                      flush=True)
    elif args.cmd == "probe-server":
        probe_server(_addr(args.listen))
    else:
        print(json.dumps(probe(_addr(args.to), args.pings, int(args.bulk_mb * 2**20))),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
