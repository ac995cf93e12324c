"""Node <-> node MPC traffic: SPU's brpc link over Unix sockets, carried by mutual-TLS tunnels.

SPU 0.9.5's brpc server accepts plaintext on its port even with its own TLS switched on, and
trusts the ``sender_rank`` a request claims, so a brpc port reachable by anyone lets them
inject MPC messages. Here no brpc port exists on any network: each node's brpc server listens
on a Unix socket in a private (0700) folder, and its peers are reached through Unix sockets of
this module. Between nodes, the only listener is a TLS 1.3 server that demands a node
certificate of the service's CA (tls.py); what it accepts is piped to the local brpc socket.

For node ``i``::

    brpc(i) --unix--> peer_j.sock --TLS, cert node i--> node j's public link port
                                                         --unix--> brpc(j)

An outbound tunnel connects with ``server_hostname = <node j's id>``: the far end must hold
node j's certificate. An inbound connection must present the certificate of another node of
this cluster; anything else (plain HTTP, a self-signed or foreign-CA certificate, an owner or
client certificate, silence past the handshake timeout) is dropped before a byte reaches brpc.
The tunnels run on an asyncio loop in a daemon thread: SPU releases the GIL while it computes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from pathlib import Path

from mpcformer_jax.private.launcher import PortInUse
from mpcformer_jax.private.tls import Identity, client_context, server_context, subject_of

_CHUNK = 1 << 20
# How much a stream may buffer before asyncio pauses reading from its transport. asyncio's
# 64 KiB default pauses and resumes the TLS transport many times per MPC message (SPU sends
# megabytes at once); under load that stalled traffic (brpc resent messages, "Duplicate ACK").
_BUFFER = 64 << 20
HANDSHAKE_TIMEOUT_S = 10.0


class TunnelError(RuntimeError):
    """A tunnel endpoint could not be opened (port taken, bad address)."""


class Tunnels:
    """Node ``rank``'s half of the tunnel mesh.

    Args:
      ident: this node's credentials.
      node_ids: every node's id, by rank.
      public: every node's public link address (host, port), by rank; this node listens on
        its own entry, connects to the others.
      sock_dir: a private folder for this node's Unix sockets.
    """

    def __init__(self, ident: Identity, node_ids, rank: int, public, sock_dir: Path):
        self.ident, self.ids, self.rank = ident, list(node_ids), rank
        self.public, self.dir = [tuple(a) for a in public], Path(sock_dir)
        self.refused: list[str] = []  # certificates refused after a TLS handshake
        self.accepted = self.established = 0  # TCP connections; of those, TLS handshakes
        self.bytes = {"in": 0, "out": 0}
        self._loop = asyncio.new_event_loop()
        # asyncio warns on every TLS stream that half-closes ("returning true from
        # eof_received() has no effect"): harmless here, and a node's stderr is for errors.
        logging.getLogger("asyncio").setLevel(logging.ERROR)
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"tunnels-{rank}")

    @property
    def brpc_self(self) -> str:
        """The address this node's brpc server listens on."""
        return f"unix:{self.dir / 'self.sock'}"

    def brpc_peer(self, j: int) -> str:
        """The address at which this node's brpc reaches node ``j``."""
        return f"unix:{self.dir / f'peer{j}.sock'}"

    def start(self) -> None:
        """Opens the public TLS listener and one local socket per peer."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> None:
        host, port = self.public[self.rank]
        self._in_ctx = server_context(self.ident)
        self._out_ctx = client_context(self.ident)

        def accept():
            # Called for every TCP connection, before its TLS handshake; _inbound only for
            # those whose handshake succeeded. The difference counts the refused ones.
            self.accepted += 1
            reader = asyncio.StreamReader(limit=_BUFFER)
            return asyncio.StreamReaderProtocol(reader, self._inbound)

        try:
            self._servers.append(await self._loop.create_server(
                accept, host, port, ssl=self._in_ctx, reuse_address=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S))
        except OSError as err:
            taken = err.errno == errno.EADDRINUSE
            raise (PortInUse if taken else TunnelError)(
                f"node {self.ids[self.rank]}: cannot listen for peer nodes on {host}:{port}"
                f" ({'port already in use' if taken else err}); free it or change 'link' in "
                "the config") from None
        for j in range(len(self.ids)):
            if j != self.rank:
                self._servers.append(await asyncio.start_unix_server(
                    lambda r, w, j=j: self._outbound(j, r, w),
                    path=str(self.dir / f"peer{j}.sock"), limit=_BUFFER))

    @property
    def refusals(self) -> int:
        """Inbound connections turned away: failed TLS handshakes (plain HTTP, no or a foreign
        certificate, silence) and certificates that are not a peer node's."""
        return self.accepted - self.established + len(self.refused)

    async def _inbound(self, reader, writer) -> None:
        self.established += 1
        ssl_obj = writer.get_extra_info("ssl_object")
        role, name = subject_of(ssl_obj.getpeercert(binary_form=True)) if ssl_obj else ("", "")
        if role != "node" or name not in self.ids or name == self.ids[self.rank]:
            self.refused.append(f"certificate {role}/{name} is not a peer node")
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_unix_connection(str(self.dir / "self.sock"),
                                                            limit=_BUFFER)
        except OSError:
            writer.close()
            return
        await self._join(reader, writer, up_r, up_w, "in")

    async def _outbound(self, j: int, reader, writer) -> None:
        host, port = self.public[j]
        try:
            far_r, far_w = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=self._out_ctx, server_hostname=self.ids[j], limit=_BUFFER),
                HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, OSError):
            writer.close()  # brpc retries the connection (the peer may not be up yet)
            return
        role, name = subject_of(far_w.get_extra_info("ssl_object").getpeercert(True))
        if (role, name) != ("node", self.ids[j]):
            far_w.close()
            writer.close()
            return
        await self._join(reader, writer, far_r, far_w, "out")

    async def _join(self, r1, w1, r2, w2, direction: str) -> None:
        try:
            await asyncio.gather(self._pipe(r1, w2, direction), self._pipe(r2, w1, None),
                                 return_exceptions=True)
        except asyncio.CancelledError:
            # ``close`` cancels the open pipes. A connection handler that ends cancelled is
            # logged as "Exception in callback ..." with a traceback by Python 3.11's
            # asyncio streams (3.12 checks ``task.cancelled()`` first): end it normally.
            pass

    async def _pipe(self, reader, writer, count: str | None) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if count:
                    self.bytes[count] += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    def close(self) -> None:
        """Closes every listener and stops the loop."""
        if not self._thread.is_alive():
            return

        async def stop():
            for s in self._servers:
                s.close()
            # Open pipes end here, not as "Task was destroyed but it is pending" at exit.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
