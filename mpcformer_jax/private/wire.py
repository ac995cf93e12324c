"""Share transport between the owner, the client and the nodes: framed, authenticated TCP.

Node <-> node MPC traffic goes over SPU's brpc link; this module carries only what enters and
leaves the cluster: the owner's weight shares and executables, the client's input shares and
the output shares returned to the client. Every frame carries an HMAC-SHA256 under a key the
roles share (``SPU_RUN_KEY``), so another local user cannot inject or forge frames. No pickle:
a frame is a JSON header plus raw byte blobs. Frames are not encrypted; across hosts, run them
through TLS (an SSH tunnel or a VPN) -- each node receives one share only, but the client's
output shares together reveal its logits.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import socket
import struct
import time
from typing import Any

import spu.libspu as libspu

_MAX_FRAME = 16 * 2**30


class WireError(RuntimeError):
    """A peer is unreachable, closed the connection, timed out or sent a bad frame."""


class PortInUse(WireError):
    """A listening port is taken."""


def check_port_free(host: str, port: int, what: str) -> None:
    """Raises PortInUse with advice if ``host:port`` cannot be bound."""
    sock = listen(host, port, what)
    sock.close()


def listen(host: str, port: int, what: str) -> socket.socket:
    """A listening socket on ``host:port``; a taken port raises PortInUse saying what to do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise PortInUse(f"{what}: port {host}:{port} is already in use; stop the process "
                            f"holding it (`ss -ltnp | grep :{port}`) or choose another port in "
                            "the config (0 = any free port)") from None
        raise WireError(f"{what}: cannot listen on {host}:{port}: {err}") from None
    sock.listen(8)
    return sock


class Channel:
    """One authenticated, framed connection to a named peer."""

    def __init__(self, sock: socket.socket, key: bytes, peer: str):
        self.sock, self.key, self.peer = sock, key, peer
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, kind: str, meta: dict[str, Any] | None = None, blobs=()) -> int:
        """Sends one frame; returns its size in bytes."""
        header = json.dumps({"kind": kind, "meta": meta or {},
                             "sizes": [len(b) for b in blobs]}).encode()
        parts = [struct.pack("!I", len(header)), header, *blobs]
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        size = sum(len(p) for p in parts)
        try:
            self.sock.sendall(struct.pack("!Q", size))
            for part in parts:
                self.sock.sendall(part)
            self.sock.sendall(mac.digest())
        except OSError as err:
            raise WireError(f"lost the connection to {self.peer} while sending: {err}") from None
        return size

    def _read(self, n: int, deadline: float) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WireError(f"timed out waiting for {self.peer}")
            self.sock.settimeout(remaining)
            try:
                k = self.sock.recv_into(view[got:], min(n - got, 1 << 22))
            except TimeoutError:
                raise WireError(f"timed out waiting for {self.peer}") from None
            except OSError as err:
                raise WireError(f"lost the connection to {self.peer}: {err}") from None
            if k == 0:
                raise WireError(f"{self.peer} closed the connection (did it fail or exit?)")
            got += k
        return bytes(buf)

    def recv(self, timeout: float, expect: str | None = None) -> tuple[str, dict, list[bytes]]:
        """Receives one frame: ``(kind, meta, blobs)``. A peer's "error" frame is raised."""
        deadline = time.monotonic() + timeout
        (size,) = struct.unpack("!Q", self._read(8, deadline))
        if size > _MAX_FRAME:
            raise WireError(f"{self.peer} sent a frame of {size} bytes: not a spu_run peer?")
        body = self._read(size, deadline)
        tag = self._read(32, deadline)
        if not hmac.compare_digest(tag, hmac.new(self.key, body, hashlib.sha256).digest()):
            raise WireError(f"bad authentication from {self.peer}: the roles must share the "
                            "same SPU_RUN_KEY")
        (hlen,) = struct.unpack("!I", body[:4])
        header = json.loads(body[4:4 + hlen])
        blobs, offset = [], 4 + hlen
        for n in header["sizes"]:
            blobs.append(body[offset:offset + n])
            offset += n
        kind, meta = header["kind"], header["meta"]
        if kind == "error":
            raise WireError(f"{self.peer} reported: {meta.get('message')}")
        if expect is not None and kind != expect:
            raise WireError(f"{self.peer} sent {kind!r} where {expect!r} was expected")
        return kind, meta, blobs

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect(host: str, port: int, key: bytes, peer: str, timeout: float) -> Channel:
    """Connects to a peer, retrying until ``timeout`` (peers start at different times)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline -
                                                                      time.monotonic()))
            return Channel(sock, key, peer)
        except OSError as err:
            if time.monotonic() >= deadline:
                raise WireError(f"could not reach {peer} at {host}:{port} within {timeout:.0f} s"
                                f" ({err}); is it running, and is the address right?") from None
            time.sleep(0.1)


def accept(server: socket.socket, key: bytes, timeout: float, what: str) -> Channel:
    """Accepts one connection within ``timeout``."""
    server.settimeout(timeout)
    try:
        sock, addr = server.accept()
    except TimeoutError:
        raise WireError(f"{what}: nobody connected within {timeout:.0f} s") from None
    sock.settimeout(None)
    return Channel(sock, key, f"{addr[0]}:{addr[1]}")


def shares_to_blobs(shares) -> tuple[list[int], list[bytes]]:
    """Flattens SPU shares into blobs: per share, meta then its chunks."""
    counts, blobs = [], []
    for share in shares:
        chunks = list(share.share_chunks)
        counts.append(len(chunks))
        blobs += [share.meta, *chunks]
    return counts, blobs


def blobs_to_shares(counts: list[int], blobs: list[bytes]) -> list:
    """Inverse of ``shares_to_blobs``."""
    shares, i = [], 0
    for n in counts:
        share = libspu.Share()
        share.meta = blobs[i]
        share.share_chunks = list(blobs[i + 1:i + 1 + n])
        shares.append(share)
        i += 1 + n
    return shares
