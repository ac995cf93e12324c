"""``spu_run serve``: a long-lived private classifier.

The service process is the model owner. It checks everything knowable first (config, model
folder, buckets, certificates, ports, memory: about a second), then starts the compute nodes
as local processes (or, with ``remote_nodes``, reaches nodes started on other hosts with
``spu_run node``), compiles every bucket once, shares the weights once, and writes
``<state>/endpoint.json`` (addresses, model fingerprint, buckets, program digests, where the
public card and the certificates are) before printing one ``ready`` line. Clients then query
the nodes directly (roles/client.py); the service only watches.

If a local node dies, the service stops the others, starts fresh nodes on the same addresses
and re-shares the weights (with fresh randomness); queries in flight fail with UNAVAILABLE and
the client sends them again. SIGTERM or SIGINT stops everything: nodes, their private folders,
endpoint.json. Nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from mpcformer_jax.private import launcher
from mpcformer_jax.private.card import export_card
from mpcformer_jax.private.config import ClusterConfig, ConfigError
from mpcformer_jax.private.roles.client import ENDPOINT
from mpcformer_jax.private.roles.owner import Owner, OwnerError, bucket_name, parse_buckets
from mpcformer_jax.private.runtime import bytes_per_element, mem_available
from mpcformer_jax.private.tls import CertError, identity, make_certs

DEFAULT_BUCKETS = "1x16,1x32,8x32,8x64"
# More restarts than this within _RESTART_WINDOW_S mean something is wrong beyond a crash (a
# node that cannot start loops every few seconds); a node lost every few minutes is served on.
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 300.0
_PORT_ATTEMPTS = 3  # launches with freshly chosen ports, when one chosen at launch was taken


class ServiceError(RuntimeError):
    """The service cannot start or go on; one line says why and what to do."""


def log(msg: str) -> None:
    print(f"spu_run serve: {msg}", file=sys.stderr, flush=True)


def estimate_memory(model_config, n_params: int, cluster: ClusterConfig, buckets,
                    local_nodes: bool) -> dict[str, int]:
    """Bytes the nodes will hold: weight shares, plus the queued and running queries' input
    shares (one-hot or public-table rows, and the mask) and SPU's working copies of the
    largest bucket (measured: about 3x its input).

    A rough upper bound, to refuse a start that cannot fit instead of dying in ``bad_alloc``.
    """
    from mpcformer_jax.private.model import client_input_width

    per_elem = bytes_per_element(cluster.runtime_config(), cluster.world_size)
    width = client_input_width(model_config) + 1
    largest = max(b * n * width for b, n in buckets)
    per_node = n_params * per_elem + (cluster.max_queue + 3) * largest * per_elem
    nodes = cluster.world_size if local_nodes else 1
    return {"per_node": per_node, "total": per_node * nodes, "available": mem_available()}


def preflight(cluster: ClusterConfig, model_dir: str | Path, buckets, local_nodes: bool
              ) -> tuple[object, list[tuple[int, int]]]:
    """Checks what can be checked before any role starts; returns (model config, buckets).

    Raises:
      ServiceError: a missing or unreadable model, a bucket longer than the model, a port in
        use, or an estimate above this machine's available memory.
    """
    from mpcformer_jax.models import BertConfig, resolve_checkpoint
    from mpcformer_jax.private.model import prepared_config

    try:
        folder = resolve_checkpoint(model_dir)
        hf = json.loads((folder / "config.json").read_text())
        config = prepared_config(BertConfig.from_hf_config(hf), cluster.protocol)  # as served
    except FileNotFoundError as err:
        raise ServiceError(f"model {str(model_dir)!r}: {err}") from None
    except (OSError, json.JSONDecodeError, ValueError, KeyError, TypeError) as err:
        raise ServiceError(f"model {str(model_dir)!r}: cannot read its config.json ({err}); "
                           "pass a folder written by save_pretrained") from None
    if not any((folder / f).exists() for f in ("model.safetensors", "flax_model.msgpack")):
        raise ServiceError(f"model {folder} has no model.safetensors: pass a folder written by "
                           "save_pretrained (an exported student)")
    try:
        buckets = parse_buckets(buckets)
    except OwnerError as err:
        raise ServiceError(str(err)) from None
    too_long = [b for b in buckets if b[1] > config.max_length]
    if too_long:
        raise ServiceError(f"bucket {bucket_name(*too_long[0])} is longer than the model's "
                           f"{config.max_length} positions; lower its length")
    if local_nodes:
        for node in cluster.nodes:
            for what, (host, port) in (("io", node.io), ("link", node.link)):
                if port:
                    try:
                        launcher.check_port_free(host, port, f"node {node.id} {what}")
                    except OSError as err:
                        raise ServiceError(str(err)) from None
    n_params = _count_params(config)
    mem = estimate_memory(config, n_params, cluster, buckets, local_nodes)
    if mem["total"] > mem["available"]:
        raise ServiceError(
            f"the nodes would need about {mem['total'] / 2**30:.1f} GiB (weights shares and "
            f"up to {cluster.max_queue} queued queries of the largest bucket "
            f"{bucket_name(*buckets[-1])}), but {mem['available'] / 2**30:.1f} GiB are "
            "available; use smaller buckets or a smaller service.max_queue in the config")
    return config, buckets


def _count_params(config) -> int:
    """Weights the owner shares for a prepared ``config`` (no public word table)."""
    import jax

    from mpcformer_jax.private.model import prepared_param_shapes

    return sum(int(x.size) for x in jax.tree_util.tree_leaves(prepared_param_shapes(config)))


@dataclasses.dataclass
class _LocalNodes:
    procs: list
    dirs: list[Path]


class Service:
    """A served model. ``start()``, then ``wait()`` until a signal, then ``stop()``.

    Args:
      cluster: the cluster config (ports 0 are chosen now and kept across restarts).
      model_dir: the exported student (read by this process only).
      state_dir: where endpoint.json, the card and (if made here) the certificates go.
      buckets: "BxL,..." or a list of (batch, length).
      certs: a certificates folder (``spu_run certs``); default ``<state>/certs``, made if
        absent.
      remote_nodes: the nodes run elsewhere (``spu_run node``); only upload to them.
      plain_node_links: benchmarks only (``experiments.serve_benchmark`` measures what the
        tunnels cost with it): node <-> node MPC traffic in the clear over loopback TCP.
    """

    def __init__(self, cluster: ClusterConfig, model_dir: str | Path, state_dir: str | Path,
                 buckets=DEFAULT_BUCKETS, certs: str | Path | None = None,
                 remote_nodes: bool = False, attribution: str = "segments",
                 plain_node_links: bool = False):
        self.remote, self.plain_node_links = remote_nodes, plain_node_links
        if remote_nodes and cluster.needs_ports:
            raise ConfigError("nodes on other hosts need fixed ports in the config (port 0 "
                              "is chosen at launch, which only works when serve starts them)")
        self.requested = cluster  # ports 0 as asked, to choose again if one was taken
        self.cluster = cluster if remote_nodes else launcher.resolve_ports(cluster)
        self.model_dir, self.state = str(model_dir), Path(state_dir)
        self.config, self.buckets = preflight(self.cluster, model_dir, buckets,
                                              not remote_nodes)
        self.certs = Path(certs) if certs else self.state / "certs"
        self.attribution = attribution
        self.owner: Owner | None = None
        self.nodes: _LocalNodes | None = None
        self.generation = 0
        self.restarts: list[float] = []  # recent ones, for the restart budget
        self.restart_count = 0
        self.started_at = time.time()
        self.carried: dict = {}  # node 0's counters of earlier node generations (status.py)
        self._last_stats: dict = {}
        self.upload = None
        self._stop = False

    # ------------------------------------------------------------------ start

    def _credentials(self):
        if not (self.certs / "ca.pem").exists():
            if self.remote:
                raise CertError(f"no certificates in {self.certs}; make them with `spu_run certs"
                                f" --out {self.certs} --config CONFIG` and copy each host its own")
            make_certs(self.certs, [n.id for n in self.cluster.nodes])
            log(f"made a CA and certificates in {self.certs}")
        if not self.remote:  # every local node's credentials, before any node starts
            for node in self.cluster.nodes:
                identity(self.certs, node.id)
        return identity(self.certs, "owner")

    def start(self) -> None:
        """Starts the nodes, compiles, shares the weights, writes endpoint.json."""
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / ENDPOINT).unlink(missing_ok=True)
        ident = self._credentials()
        salt_file = self.state / "owner.salt"
        if not salt_file.exists():
            fd = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(16))
        if not self.remote:
            self._start_nodes()
        t0 = time.perf_counter()
        self.owner = Owner(self.model_dir, self.cluster, self.buckets, ident, self.attribution,
                           salt_file.read_bytes())
        log(f"compiled {len(self.buckets)} bucket(s) in {time.perf_counter() - t0:.1f} s")
        # The card carries the config the owner compiled (prepared), so a client recompiles
        # the very program the nodes run (Client.verify).
        export_card(self.model_dir, self.state / "card", self.owner.config)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._upload()
                return
            except ServiceError:
                taken = self._port_taken()
                if taken is None or attempt == _PORT_ATTEMPTS:
                    raise
            # A port chosen at launch was taken before the node listened on it (another
            # process chose it too): choose the ports again, no harm done yet.
            log(f"node {taken} found a port chosen for it taken; choosing new ports")
            self._stop_nodes()
            self.cluster = launcher.resolve_ports(self.requested)
            self.owner.cluster = self.cluster
            self._start_nodes()

    def _start_nodes(self) -> None:
        # Registered before anything starts, so a failure half-way still cleans up all.
        self.nodes = _LocalNodes([], [])
        for rank, node in enumerate(self.cluster.nodes):
            workdir = Path(tempfile.mkdtemp(prefix="spu_"))
            self.nodes.dirs.append(workdir)
            self.nodes.procs.append(launcher.start_role(
                node.id, "mpcformer_jax.private.roles.node:node_main",
                {"cluster": self.cluster, "rank": rank,
                 "ident": identity(self.certs, node.id), "workdir": str(workdir),
                 "plain_link": self.plain_node_links}))

    def _stop_nodes(self) -> None:
        if self.nodes is None:
            return
        launcher.stop_all(self.nodes.procs, grace_s=3.0)
        for d in self.nodes.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.nodes = None

    def _upload(self) -> None:
        t0 = time.perf_counter()
        try:
            self.upload = self.owner.upload(self.cluster.timeout_s, gone=self._node_gone)
        except OwnerError as err:
            dead = self._dead_node()
            raise ServiceError(dead or str(err)) from None
        self.generation += 1
        log(f"shared the weights: {sum(self.upload.bytes_per_node) / 2**20:.1f} MiB to "
            f"{self.cluster.world_size} nodes in {time.perf_counter() - t0:.1f} s")
        self._write_endpoint()

    def _write_endpoint(self) -> None:
        endpoint = {
            "ready": True, "generation": self.generation, "pid": os.getpid(),
            "protocol": self.cluster.protocol, "cluster": self.cluster.to_dict(),
            "nodes": [{"id": n.id, "io": f"{n.io[0]}:{n.io[1]}"} for n in self.cluster.nodes],
            "fingerprint": self.owner.fingerprint,
            "buckets": [bucket_name(b, n) for b, n in self.buckets],
            "attribution": self.attribution,
            "program_digests": self.owner.digests, "card": "card",
            "certs": str(self.certs.resolve()),
            "upload": {**self.upload.to_dict(), "compile_s": self.owner.compile_s},
            "started_at": self.started_at, "restarts": self.restart_count,
            "carried": self.carried,
        }
        tmp = self.state / f".{ENDPOINT}.tmp"
        tmp.write_text(json.dumps(endpoint, indent=2))
        tmp.replace(self.state / ENDPOINT)

    # ------------------------------------------------------------------ watch and stop

    def _node_gone(self) -> str | None:
        """Why a local node will not answer (its process exited), without reaping it."""
        if self.nodes is None:
            return None
        gone = [p.name for p in self.nodes.procs if not p.is_alive()]
        return f"node {gone[0]} exited before taking its share" if gone else None

    def _port_taken(self) -> str | None:
        """The local node that exited because a port chosen at launch was taken, if any."""
        if self.nodes is None or not self.requested.needs_ports:
            return None
        for p in self.nodes.procs:
            if not p.is_alive():
                p.join()
                if p.exitcode == launcher.EXIT_PORT_IN_USE:
                    return p.name
        return None

    def _dead_node(self) -> str | None:
        if self.nodes is None:
            return None
        for p in self.nodes.procs:
            if not p.is_alive():
                p.join()
                return f"node {p.name} {launcher.describe(p.exitcode)}"
        return None

    def _unreachable_node(self) -> str | None:
        """Remote nodes: the first that does not answer Info within a few seconds."""
        from mpcformer_jax.private import transport

        for node in self.cluster.nodes:
            ch = transport.channel(f"{node.io[0]}:{node.io[1]}", node.id, self.owner.ident)
            try:
                transport.unary(ch, "Info")(b"{}", timeout=5)
            except Exception as err:
                text = transport.error_text(err) if hasattr(err, "code") else str(err)
                return f"node {node.id} at {node.io[0]}:{node.io[1]} is unreachable ({text})"
            finally:
                ch.close()
        return None

    def _poll_stats(self) -> None:
        """Keeps node 0's latest counters, so a restart can carry them over."""
        from mpcformer_jax.private import transport

        node = self.cluster.nodes[0]
        ch = transport.channel(f"{node.io[0]}:{node.io[1]}", node.id, self.owner.ident)
        try:
            info, _ = transport.unpack(transport.unary(ch, "Info")(b"{}", timeout=5))
            self._last_stats = info.get("stats") or self._last_stats
        except Exception:
            pass  # a node that does not answer is the watchdog's business
        finally:
            ch.close()

    def wait(self, poll_s: float = 0.2, remote_poll_s: float = 2.0,
             stats_poll_s: float = 5.0) -> None:
        """Watches the nodes until ``request_stop``. A local node that dies is restarted
        with the others; a remote node that stops answering stops the service (the operator
        restarts the nodes, then ``serve`` again)."""
        from mpcformer_jax.private.status import merge_stats

        last_remote_check = last_stats = time.monotonic()
        while not self._stop:
            time.sleep(poll_s)
            if self._stop:
                break
            if time.monotonic() - last_stats >= stats_poll_s:
                last_stats = time.monotonic()
                self._poll_stats()
            if self.remote:
                if time.monotonic() - last_remote_check >= remote_poll_s:
                    last_remote_check = time.monotonic()
                    if lost := self._unreachable_node():
                        raise ServiceError(f"{lost}; stopping the other nodes: restart the "
                                           "nodes, then `spu_run serve` again")
                continue
            dead = self._dead_node()
            if dead is None:
                continue
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < _RESTART_WINDOW_S] + [now]
            if len(self.restarts) > _MAX_RESTARTS:
                raise ServiceError(f"{dead}; it is the {len(self.restarts)}th failure in "
                                   f"{_RESTART_WINDOW_S / 60:.0f} minutes: stopping (see the "
                                   "nodes' errors above)")
            log(f"{dead}; restarting the nodes and re-sharing the weights")
            self.restart_count += 1
            self.carried = merge_stats(self.carried, self._last_stats)
            self._last_stats = {}
            self._rewrite_not_ready()
            self._stop_nodes()
            self._start_nodes()
            self._upload()
            log(f"ready again (generation {self.generation})")

    def _rewrite_not_ready(self) -> None:
        path = self.state / ENDPOINT
        try:
            endpoint = json.loads(path.read_text())
            endpoint["ready"] = False
            tmp = self.state / f".{ENDPOINT}.tmp"
            tmp.write_text(json.dumps(endpoint, indent=2))
            tmp.replace(path)
        except (OSError, json.JSONDecodeError):
            pass

    def request_stop(self, *_args) -> None:
        self._stop = True

    def stop(self) -> None:
        """Stops the nodes (asks remote ones), removes their folders and endpoint.json."""
        (self.state / ENDPOINT).unlink(missing_ok=True)
        (self.state / f".{ENDPOINT}.tmp").unlink(missing_ok=True)
        if self.remote and self.owner is not None:
            self.owner.shutdown_nodes()
        self._stop_nodes()


def serve(cluster: ClusterConfig, model_dir: str, state_dir: str, buckets: str,
          certs: str | None = None, remote_nodes: bool = False,
          attribution: str = "segments") -> None:
    """``spu_run serve``: start, print ``ready``, serve until SIGTERM/SIGINT, clean up."""
    service = Service(cluster, model_dir, state_dir, buckets, certs, remote_nodes, attribution)
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    try:
        service.start()
        print(f"ready {Path(state_dir) / ENDPOINT}", flush=True)
        service.wait()
    finally:
        service.stop()
        log("stopped")
