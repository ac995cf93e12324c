"""Cluster + runtime configs for private inference, loaded from JSON and validated on load.

A config file looks like (``spu_configs/aby3_3pc.json``)::

    {"protocol": "ABY3",
     "nodes": [{"id": "node0", "link": "127.0.0.1:0", "io": "127.0.0.1:0"}, ...],
     "runtime": {"field": "FM64", "fxp_fraction_bits": 18, "fxp_exp_mode": "EXP_TAYLOR"},
     "compiler": {"enable_optimize_denominator_with_broadcast": true},
     "link": {"connect_retry_times": 30, "connect_retry_interval_ms": 200,
              "recv_timeout_ms": 30000},
     "service": {"max_queue": 32, "share_wait_s": 30, "max_batch_delay_ms": 200},
     "timeout_s": 60}

A node's ``link`` is where it accepts the mutual-TLS tunnels of the other nodes (node <-> node
MPC traffic; SPU's own brpc server listens on a private Unix socket, see tunnel.py); ``io`` is
its gRPC service, where the model owner uploads weight shares and clients send queries, both
over mutual TLS. Port 0 means "choose a free port at launch" (only ``spu_run`` with all roles
on one machine can do that; separately started roles need fixed ports). ``service`` bounds a
served model: ``max_queue`` queries waiting per node (1 to 1024; more are refused as "queue full"),
``share_wait_s``, how long a node waits for a query's shares to reach every node,
``max_batch_delay_ms``, how long node 0 holds the oldest waiting query for others to join
its execution (a full batch runs at once), and ``batching`` (default true; false runs every
query in an execution of its own, for comparison).
``runtime`` holds fields of SPU's ``RuntimeConfig`` protobuf and ``compiler`` fields of
``CompilerOptions``; both are checked against the installed SPU, so an unknown or misspelt
field is an error naming it.
``timeout_s`` bounds every wait of every role (connect, share transfer, one batch).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
from pathlib import Path
from typing import Any

import spu.libspu as libspu

PROTOCOL_PARTIES = {"ABY3": (3,), "SEMI2K": (2, 3, 4, 5), "CHEETAH": (2,), "REF2K": (1,)}
_TOP_KEYS = {"protocol", "nodes", "runtime", "compiler", "link", "service", "timeout_s",
             "description"}
_NODE_KEYS = {"id", "link", "io"}
# brpc knobs a config may set, with their types (SPU's pybind setters would raise on others).
_LINK_KEYS = {"connect_retry_times": int, "connect_retry_interval_ms": int,
              "recv_timeout_ms": int, "http_timeout_ms": int, "throttle_window_size": int,
              "brpc_channel_protocol": str}
_SERVICE_KEYS = {"max_queue": int, "share_wait_s": (int, float),
                 "max_batch_delay_ms": (int, float), "batching": bool}
# 200 ms: short beside one execution (10-30 s for MiniLM on 2 cores), long enough for
# clients that start together, or that one execution just answered, to share the next.
_SERVICE_DEFAULTS = {"max_queue": 32, "share_wait_s": 30.0, "max_batch_delay_ms": 200.0,
                     "batching": True}
# The most queries a node lets wait: it keeps a gRPC thread per slot (transport.server).
MAX_QUEUE = 1024
# Set by this package, not by a config: profiling is how the cost report is measured.
_RESERVED_RUNTIME = {"protocol", "enable_pphlo_profile", "enable_hal_profile"}


class ConfigError(ValueError):
    """A cluster/runtime config is invalid; the message says which field and why."""


def _public_fields(obj) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_") and not callable(getattr(obj, n))
            and not n[0].isupper()}


RUNTIME_FIELDS = _public_fields(libspu.RuntimeConfig())
COMPILER_FIELDS = _public_fields(libspu.CompilerOptions())


@dataclasses.dataclass(frozen=True)
class Node:
    """One compute node: its id, brpc link address and share-I/O address (host, port)."""

    id: str
    link: tuple[str, int]
    io: tuple[str, int]

    @property
    def link_addr(self) -> str:
        return f"{self.link[0]}:{self.link[1]}"


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """A validated config. ``runtime``/``compiler``/``link`` keep the JSON values (hashable)."""

    protocol: str
    nodes: tuple[Node, ...]
    runtime: tuple[tuple[str, Any], ...] = ()
    compiler: tuple[tuple[str, Any], ...] = ()
    link: tuple[tuple[str, Any], ...] = ()
    timeout_s: float = 60.0
    service: tuple[tuple[str, Any], ...] = ()

    @property
    def max_queue(self) -> int:
        return int(dict(self.service).get("max_queue", _SERVICE_DEFAULTS["max_queue"]))

    @property
    def max_batch_delay_s(self) -> float:
        return float(dict(self.service).get(
            "max_batch_delay_ms", _SERVICE_DEFAULTS["max_batch_delay_ms"])) / 1000

    @property
    def batching(self) -> bool:
        return bool(dict(self.service).get("batching", _SERVICE_DEFAULTS["batching"]))

    @property
    def share_wait_s(self) -> float:
        return float(dict(self.service).get("share_wait_s", _SERVICE_DEFAULTS["share_wait_s"]))

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    @property
    def needs_ports(self) -> bool:
        """True when some port is 0, i.e. chosen at launch."""
        return any(n.link[1] == 0 or n.io[1] == 0 for n in self.nodes)

    def runtime_config(self, profile: bool = True) -> libspu.RuntimeConfig:
        """SPU's RuntimeConfig for this config; pphlo profiling on (the cost report needs it)."""
        rt = runtime_from_dict(self.protocol, dict(self.runtime))
        rt.enable_pphlo_profile = profile
        return rt

    def compiler_options(self) -> libspu.CompilerOptions:
        """SPU's CompilerOptions for this config."""
        copts = libspu.CompilerOptions()
        for key, value in self.compiler:
            setattr(copts, key, value)
        return copts

    def link_desc(self, addresses=None, recv_timeout_ms: int | None = None
                  ) -> libspu.link.Desc:
        """A brpc link description of the nodes, with this config's retry/timeout knobs.

        ``addresses`` (one per rank) replaces the nodes' link addresses: a node's own entry is
        where its brpc listens, the others where it reaches them (tunnel.py's Unix sockets).
        """
        desc = libspu.link.Desc()
        desc.connect_retry_times = 30
        desc.connect_retry_interval_ms = 200
        desc.recv_timeout_ms = int(self.timeout_s * 1000)
        # brpc's own per-message deadline (20 s by default) must not be shorter than a wait
        # the config allows: on 2 busy cores one message of a large model can take longer, and
        # a timed-out brpc push was followed by a crash of SPU's link (seen under overload).
        desc.http_timeout_ms = int(self.timeout_s * 1000)
        for key, value in self.link:
            setattr(desc, key, value)
        if recv_timeout_ms is not None:
            desc.recv_timeout_ms = recv_timeout_ms
        for node, addr in zip(self.nodes, addresses or [n.link_addr for n in self.nodes],
                              strict=True):
            desc.add_party(node.id, addr)
        return desc

    def with_nodes(self, nodes) -> ClusterConfig:
        """A copy with other node addresses (e.g. ports chosen at launch)."""
        return dataclasses.replace(self, nodes=tuple(nodes))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``load_config(to_dict())`` round-trips)."""
        return {"protocol": self.protocol,
                "nodes": [{"id": n.id, "link": f"{n.link[0]}:{n.link[1]}",
                           "io": f"{n.io[0]}:{n.io[1]}"} for n in self.nodes],
                "runtime": dict(self.runtime), "compiler": dict(self.compiler),
                "link": dict(self.link), "service": dict(self.service),
                "timeout_s": self.timeout_s}


def runtime_from_dict(protocol: str, runtime: dict[str, Any]) -> libspu.RuntimeConfig:
    """Builds a RuntimeConfig via protobuf JSON; a bad field or value raises ConfigError."""
    unknown = sorted(set(runtime) - RUNTIME_FIELDS)
    if unknown:
        hints = {u: difflib.get_close_matches(u, RUNTIME_FIELDS, 1) for u in unknown}
        hint = "".join(f" (did you mean {h[0]!r} for {u!r}?)" for u, h in hints.items() if h)
        raise ConfigError(f"unknown runtime field(s) {unknown}{hint}; RuntimeConfig fields of "
                          f"SPU {_spu_version()} are: {', '.join(sorted(RUNTIME_FIELDS))}")
    reserved = sorted(set(runtime) & _RESERVED_RUNTIME)
    if reserved:
        raise ConfigError(f"runtime field(s) {reserved} are set by mpcformer_jax (protocol at "
                          "the top level; profiling is always on): remove them")
    rt = libspu.RuntimeConfig()
    for key, value in runtime.items():  # one at a time, so the error can name the field
        if not libspu.RuntimeConfig().ParseFromJsonString(json.dumps({key: value})):
            raise ConfigError(f"runtime.{key}: invalid value {value!r} for SPU's RuntimeConfig")
    if not rt.ParseFromJsonString(json.dumps({"protocol": protocol, **runtime})):
        raise ConfigError(f"runtime section rejected by SPU's RuntimeConfig: {runtime}")
    if rt.field == libspu.FieldType.FT_INVALID:
        rt.field = libspu.FieldType.FM64
    return rt


def _spu_version() -> str:
    import spu

    return spu.__version__


def _address(value: Any, where: str) -> tuple[str, int]:
    if not isinstance(value, str) or value.count(":") != 1:
        raise ConfigError(f"{where}: bad address {value!r}; expected 'host:port', e.g. "
                          "'127.0.0.1:9100' (port 0 = choose at launch)")
    host, port = value.rsplit(":", 1)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not host or not all(p.isalnum() or "-" in p for p in host.split(".")):
                raise ConfigError(f"{where}: bad host {host!r} in {value!r}") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: bad port {port!r} in {value!r}; expected 0-65535")
    return host, int(port)


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def _check_typed(section: dict, types: dict[str, Any], where: str) -> None:
    _check_keys(section, set(types), where)
    for key, value in section.items():
        if types[key] is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, types[key]):
            want = getattr(types[key], "__name__", "number")
            raise ConfigError(f"{where}.{key} must be a {want}, got {value!r}")
        if isinstance(value, int | float) and value < 0:
            raise ConfigError(f"{where}.{key} must not be negative, got {value!r}")


def parse_config(data: dict[str, Any], source: str = "config") -> ClusterConfig:
    """Validates a config dict and returns a ClusterConfig; errors raise ConfigError."""
    _check_keys(data, _TOP_KEYS, source)
    protocol = data.get("protocol")
    if protocol not in PROTOCOL_PARTIES:
        raise ConfigError(f"{source}: unknown protocol {protocol!r}; choose one of "
                          f"{sorted(PROTOCOL_PARTIES)}")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError(f"{source}: 'nodes' must be a non-empty list of "
                          "{'id', 'link', 'io'} objects")
    if len(raw_nodes) not in PROTOCOL_PARTIES[protocol]:
        raise ConfigError(f"{source}: {protocol} runs with {PROTOCOL_PARTIES[protocol]} "
                          f"node(s), the config lists {len(raw_nodes)}")
    nodes, seen_ports, seen_ids = [], {}, set()
    for i, raw in enumerate(raw_nodes):
        where = f"{source}: nodes[{i}]"
        _check_keys(raw, _NODE_KEYS, where)
        missing = sorted(_NODE_KEYS - set(raw))
        if missing:
            raise ConfigError(f"{where}: missing field(s) {missing}")
        if raw["id"] in seen_ids:
            raise ConfigError(f"{where}: duplicate node id {raw['id']!r}")
        seen_ids.add(raw["id"])
        link, io = _address(raw["link"], f"{where}.link"), _address(raw["io"], f"{where}.io")
        for kind, (host, port) in (("link", link), ("io", io)):
            if port and (host, port) in seen_ports:
                raise ConfigError(f"{where}.{kind}: duplicate port {host}:{port} (also used by "
                                  f"{seen_ports[host, port]}); every listener needs its own")
            seen_ports[host, port] = f"nodes[{i}].{kind}"
        nodes.append(Node(raw["id"], link, io))
    runtime = data.get("runtime", {})
    if not isinstance(runtime, dict):
        raise ConfigError(f"{source}: runtime must be a JSON object")
    runtime_from_dict(protocol, runtime)  # validates values
    compiler = data.get("compiler", {})
    _check_keys(compiler, COMPILER_FIELDS, f"{source}: compiler")
    for key, value in compiler.items():
        if not isinstance(value, bool | str):
            raise ConfigError(f"{source}: compiler.{key} must be a boolean, got {value!r}")
    link = data.get("link", {})
    _check_typed(link, _LINK_KEYS, f"{source}: link")
    service = data.get("service", {})
    _check_typed(service, _SERVICE_KEYS, f"{source}: service")
    if service.get("max_queue", 1) < 1 or service.get("share_wait_s", 1) <= 0:
        raise ConfigError(f"{source}: service.max_queue must be >= 1 and share_wait_s > 0")
    if service.get("max_queue", 1) > MAX_QUEUE:
        raise ConfigError(f"{source}: service.max_queue must be at most {MAX_QUEUE} (each "
                          "node keeps a thread per waiting query); got "
                          f"{service['max_queue']}")
    if service.get("max_batch_delay_ms", 0) > 60_000:
        raise ConfigError(f"{source}: service.max_batch_delay_ms must be at most 60000 (a "
                          "query would wait a minute for company)")
    timeout_s = data.get("timeout_s", 60.0)
    if not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise ConfigError(f"{source}: timeout_s must be a positive number, got {timeout_s!r}")
    return ClusterConfig(protocol, tuple(nodes), tuple(sorted(runtime.items())),
                         tuple(sorted(compiler.items())), tuple(sorted(link.items())),
                         float(timeout_s), tuple(sorted(service.items())))


CONFIG_DIR = Path(__file__).resolve().parents[2] / "spu_configs"


def load_config(path_or_name: str | Path | dict) -> ClusterConfig:
    """Loads and validates a config from a dict, a JSON path, or a name in ``spu_configs/``.

    Raises:
      ConfigError: what is wrong (unknown protocol, node count, address, duplicate port,
        unknown field) and where.
    """
    if isinstance(path_or_name, dict):
        return parse_config(path_or_name)
    path = Path(path_or_name)
    if not path.exists() and (CONFIG_DIR / f"{path_or_name}.json").exists():
        path = CONFIG_DIR / f"{path_or_name}.json"
    if not path.exists():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"no config file {str(path_or_name)!r}; ready configs: {names}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    return parse_config(data, str(path))
