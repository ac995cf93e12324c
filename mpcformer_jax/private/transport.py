"""Owner/client <-> node channels: gRPC over mutual TLS, with size limits before allocation.

gRPC brings what a hand-written framing had to grow: TLS with client certificates,
deadlines, cancellation, concurrent calls on one connection and a per-message size cap that
is enforced before a message is buffered. Messages are raw bytes (generic handlers, no
protobuf schema): a request stream is one small JSON header followed by share chunks of at
most ``CHUNK`` bytes; a response is one ``pack``-ed frame (JSON header + blobs).

Allocation is bounded at three levels: gRPC drops any message above ``MAX_MESSAGE``; a
header must declare its blob sizes, which the node checks against what it expects for that
caller (a client's shares have an exact size per bucket) before reserving memory; a stream
that sends more than it declared is cut off. A caller's role comes from its verified
certificate (``peer_identity``), never from the header.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator

import grpc

from mpcformer_jax.private.launcher import PortInUse, check_port_free
from mpcformer_jax.private.tls import Identity, subject_of

SERVICE = "mpcformer.Node"
CHUNK = 4 << 20
MAX_HEADER = 1 << 20
MAX_MESSAGE = CHUNK + (64 << 10)
_SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.so_reuseport", 0),  # no second process may share a node's port
                   ("grpc.keepalive_time_ms", 20_000),
                   ("grpc.http2.max_pings_without_data", 0),
                   ("grpc.keepalive_permit_without_calls", 1)]


class FrameError(ValueError):
    """A peer sent a malformed or oversized frame."""


def pack(header: dict, blobs: Iterable[bytes] = ()) -> bytes:
    """One frame: 4-byte header length, JSON header (with blob sizes), then the blobs."""
    blobs = list(blobs)
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    return b"".join([struct.pack("!I", len(head)), head, *blobs])


def unpack(frame: bytes) -> tuple[dict, list[bytes]]:
    """Inverse of ``pack``; a malformed frame raises FrameError."""
    if len(frame) < 4:
        raise FrameError("frame too short")
    (n,) = struct.unpack("!I", frame[:4])
    if n > MAX_HEADER or 4 + n > len(frame):
        raise FrameError("bad frame header length")
    header = parse_header(frame[4:4 + n])
    sizes, offset, blobs = header.get("sizes", []), 4 + n, []
    if sum(sizes) != len(frame) - offset:
        raise FrameError("frame sizes do not add up")
    for s in sizes:
        blobs.append(frame[offset:offset + s])
        offset += s
    return header, blobs


def parse_header(raw: bytes) -> dict:
    """A JSON object with a list of non-negative integer ``sizes``; else FrameError."""
    if len(raw) > MAX_HEADER:
        raise FrameError("header too large")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FrameError("header is not JSON") from None
    sizes = header.get("sizes", []) if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise FrameError("header must be an object with integer 'sizes'")
    return header


def stream_frames(header: dict, blobs: list[bytes]) -> Iterator[bytes]:
    """A request stream: the JSON header (with blob sizes), then the blobs in CHUNK pieces."""
    yield json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    for blob in blobs:
        view = memoryview(blob)
        for i in range(0, len(blob), CHUNK):
            yield bytes(view[i:i + CHUNK])


def receive_stream(request_iterator, limit: int | None, sizes_ok=None,
                   header: dict | None = None) -> tuple[dict, list[bytes]]:
    """Reads a ``stream_frames`` stream.

    Args:
      limit: the most bytes of blobs this caller may send (checked on the declared sizes,
        before any memory is reserved), or None.
      sizes_ok: optional ``f(header) -> str | None``: a refusal reason for the declared sizes.
      header: the header, if the caller has already read it from the stream.

    Raises:
      FrameError: a bad header, sizes over the limit, or a stream longer or shorter than it
        declared.
    """
    if header is None:
        try:
            header = parse_header(next(request_iterator))
        except StopIteration:
            raise FrameError("empty request") from None
    sizes = header["sizes"]
    if limit is not None and sum(sizes) > limit:
        raise FrameError(f"declares {sum(sizes)} bytes, more than the {limit} allowed")
    if sizes_ok is not None and (why := sizes_ok(header)):
        raise FrameError(why)
    buf = bytearray(sum(sizes))
    got = 0
    for chunk in request_iterator:
        if got + len(chunk) > len(buf):
            raise FrameError("sent more bytes than it declared")
        buf[got:got + len(chunk)] = chunk
        got += len(chunk)
    if got != len(buf):
        raise FrameError(f"stream ended after {got} of {len(buf)} declared bytes")
    view, blobs, offset = memoryview(buf), [], 0
    for s in sizes:
        blobs.append(bytes(view[offset:offset + s]))
        offset += s
    return header, blobs


def peer_identity(context: grpc.ServicerContext) -> tuple[str, str]:
    """(role, name) from the caller's verified certificate; ("", "") if there is none."""
    certs = context.auth_context().get("x509_pem_cert")
    return subject_of(certs[0]) if certs else ("", "")


def _started_pool(workers: int):
    """A ThreadPoolExecutor with all ``workers`` threads already running.

    The executor starts a thread only when a call finds none idle, so a long-lived server's
    thread count would creep up to ``workers`` with the busiest moment it has seen. Started at
    once, the count is flat from the first query on, and any later thread is a leak that the
    soak test (tests/test_soak.py) sees.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers)
    gate = threading.Barrier(workers + 1, timeout=60)
    for _ in range(workers):  # each submit finds no idle thread (all wait here) and starts one
        pool.submit(gate.wait)
    gate.wait()
    return pool


def server(address: str, ident: Identity, handlers: dict, max_workers: int,
           max_concurrent: int) -> grpc.Server:
    """A started gRPC server on ``address`` that only speaks mutual TLS under our CA.

    ``handlers`` maps method name -> ``grpc.*_rpc_method_handler`` (bytes in, bytes out).
    Raises OSError with advice when the port is taken.
    """
    cert, key, ca = ident.read()
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                        require_client_auth=True)
    srv = grpc.server(_started_pool(max_workers), options=_SERVER_OPTIONS,
                      maximum_concurrent_rpcs=max_concurrent)
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    try:
        port = srv.add_secure_port(address, creds)
    except RuntimeError:
        port = 0
    if port == 0:
        # gRPC does not say why; a bind of our own does.
        host, _, num = address.rpartition(":")
        try:
            check_port_free(host.strip("[]"), int(num), "the io listener")
        except PortInUse:
            raise
        except (OSError, ValueError):
            pass
        raise OSError(f"cannot listen on {address}: the address is not this host's or the "
                      "port is in use; free the port (`ss -ltnp`) or change 'io' in the config")
    srv.start()
    return srv


def channel(address: str, node_id: str, ident: Identity) -> grpc.Channel:
    """A mutual-TLS channel to node ``node_id`` at ``address``: the server must prove it holds
    that node's certificate (its id is the name checked), and we present ``ident``."""
    cert, key, ca = ident.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=[
        ("grpc.ssl_target_name_override", node_id), ("grpc.default_authority", node_id),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE)])


def unary(ch: grpc.Channel, method: str):
    """A bytes -> bytes unary callable for ``method``."""
    return ch.unary_unary(f"/{SERVICE}/{method}")


def stream_unary(ch: grpc.Channel, method: str):
    """A bytes-stream -> bytes callable for ``method``."""
    return ch.stream_unary(f"/{SERVICE}/{method}")


def error_text(err: grpc.RpcError) -> str:
    """The message of a gRPC error, without gRPC's debug string."""
    details = err.details() if hasattr(err, "details") else None
    code = err.code().name if hasattr(err, "code") and err.code() else "ERROR"
    return f"{details or code}"
