"""An emulated network: every role on its own host (a network namespace), links with a chosen
one-way delay and rate, its fidelity measured.

    with Emulation(["node0", "node1", "node2", "owner", "client"], PRESETS["wan"],
                   ports={"node0": [7101, 7201], ...}) as net:
        print(net.calibrate("client", "node0"))     # round trip and bulk rate, measured
        net.run("node0", ["spu_run", "node", ...])   # a process on node0's host
        net.shape(PRESETS["lan"])                    # another link, connections kept

Layout (``10.<o>`` is the emulation's own private range; nothing leaves its namespaces):

* a switch namespace ``<tag>-sw`` with a bridge; each role namespace ``<tag>-<role>`` has one
  veth port on it, address ``10.<o>.0.<i+1>``: the host's own address, used as source;
* each role's *service address* ``10.<o>.1.<i+1>`` sits on its loopback: its listeners bind
  there (the cluster config names these addresses). Every role routes ``10.<o>.1.0/24``
  through the switch, where the same addresses are local to the relay (relay.py), which
  holds each chunk for the one-way delay and forwards it inside the destination's own
  namespace. So every connection between hosts, and only those, crosses the delay once
  each way;
* the rate is ``tbf`` on both ends of every veth pair: a host's uplink and downlink. Each
  byte between two hosts crosses exactly one of them (the dialler's uplink or downlink). The
  rate is TCP's payload rate: the qdisc is set 4.6% faster to carry the frames' headers.
* ``shape`` changes delay and rate while every connection stays up (the relay takes a new
  delay on its stdin, tc replaces the qdiscs): a deployment set up once is measured on
  several links, and the weights it shares at start need not crawl through a slow one.

The kernel here has no ``netem`` qdisc (``tc qdisc add ... netem`` answers "Specified qdisc
kind is unknown"), hence the relay. Needs root and iproute2. ``close`` (also on any error
inside the ``with``) stops every process started here and removes the namespaces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class Link:
    """A link preset: one-way delay in ms and rate in Mbit/s (None: no rate limit)."""

    name: str
    delay_ms: float
    rate_mbit: float | None

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return f"{self.name}: {self.delay_ms:g} ms one way, {rate}"


# lan: a data-centre link; wan: the network model's own WAN (bench/network.py), 100 Mbps.
PRESETS = {"lan": Link("lan", 0.5, 1000.0), "wan": Link("wan", 40.0, 100.0)}
PROBE_PORT = 7999
FRAME_OVERHEAD = 1514 / 1448  # frame bytes per TCP payload byte at MTU 1500
RELAY = [sys.executable, "-m", "mpcformer_jax.bench.relay"]


class EmulationError(RuntimeError):
    """The emulated network could not be built (not root, no iproute2, a tc failure)."""


def _sh(*args: str) -> None:
    try:
        subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise EmulationError(f"{args[0]} not found: the emulation needs iproute2") from None
    except subprocess.CalledProcessError as err:
        raise EmulationError(f"`{' '.join(args)}` failed: {err.stderr.strip()} (the "
                             "emulation needs root and network namespaces)") from None


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces of emulation ``tag`` that still exist (empty once it has closed)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(f"{tag}-")]


class Emulation:
    """Roles on their own hosts joined through a delaying relay; see the module docstring.

    ``ports``: per role, the TCP ports its processes listen on (each is relayed); the
    calibration's probe port is added to every role. ``octet`` picks the private range
    ``10.<octet>``; ``tag`` prefixes the namespaces (default from the process id).
    """

    def __init__(self, roles: list[str], link: Link, ports: dict[str, list[int]] | None = None,
                 tag: str | None = None, octet: int = 78):
        if not 1 <= len(roles) <= 200:
            raise ValueError("an emulation has 1 to 200 roles")
        self.roles, self.link, self.octet = list(roles), link, octet
        self.ports = {r: sorted(set((ports or {}).get(r, [])) | {PROBE_PORT}) for r in roles}
        self.tag = tag or f"ne{os.getpid() % 100000}"
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.relay: subprocess.Popen | None = None
        self.devs: list[tuple[str, str]] = []  # (namespace, veth end) pairs that carry a rate
        self._rated = False

    # ------------------------------------------------------------------ addresses

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def host_address(self, role: str) -> str:
        return f"10.{self.octet}.0.{self.roles.index(role) + 1}"

    def address(self, role: str) -> str:
        """Where ``role``'s listeners bind and where the others reach it (via the relay)."""
        return f"10.{self.octet}.1.{self.roles.index(role) + 1}"

    # ------------------------------------------------------------------ build and tear down

    def __enter__(self) -> Emulation:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if leftover_namespaces(self.tag):
            raise EmulationError(f"namespaces {leftover_namespaces(self.tag)} exist already: "
                                 "another emulation with this tag is running, or one was "
                                 "killed; remove them with `ip netns del`")
        o, sw = self.octet, self.ns("sw")
        _sh("ip", "netns", "add", sw)
        self.made.append(sw)
        _sh("ip", "-n", sw, "link", "set", "lo", "up")
        _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", sw, "addr", "add", f"10.{o}.0.254/24", "dev", "br0")
        _sh("ip", "-n", sw, "link", "set", "br0", "up")
        for i, role in enumerate(self.roles):
            ns = self.ns(role)
            _sh("ip", "netns", "add", ns)
            self.made.append(ns)
            a, b = f"{self.tag}a{i}", f"{self.tag}b{i}"
            _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            _sh("ip", "link", "set", a, "netns", sw)
            _sh("ip", "link", "set", b, "netns", ns)
            _sh("ip", "-n", sw, "link", "set", a, "master", "br0", "up")
            _sh("ip", "-n", sw, "addr", "add", f"{self.address(role)}/32", "dev", "lo")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(role)}/32", "dev", "lo")
            _sh("ip", "-n", ns, "addr", "add", f"{self.host_address(role)}/24", "dev", b)
            _sh("ip", "-n", ns, "link", "set", b, "up")
            _sh("ip", "-n", ns, "route", "add", f"10.{o}.1.0/24", "via", f"10.{o}.0.254")
            self.devs += [(ns, b), (sw, a)]  # uplink, downlink
        self._set_rate(self.link)
        routes = [f"{self.address(r)}:{p}={self.ns(r)}" for r in self.roles
                  for p in self.ports[r]]
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", sw, *RELAY, "relay", "--delay-ms", str(self.link.delay_ms),
             *[a for r in routes for a in ("--route", r)]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        line = self.relay.stdout.readline()
        if line.strip() != "ready":
            raise EmulationError(f"the relay did not start: {self.relay.stderr.read()[-2000:]}")

    def shape(self, link: Link) -> None:
        """Puts ``link``'s delay and rate on every link, connections kept. Chunks already
        in the relay keep the delay they were read with: shape between queries."""
        self._set_rate(link)
        self.relay.stdin.write(f"delay {link.delay_ms}\n")
        self.relay.stdin.flush()
        answer = self.relay.stdout.readline().strip()
        if answer != "ok":
            raise EmulationError(f"the relay did not take the delay: {answer!r}")
        self.link = link

    def _set_rate(self, link: Link) -> None:
        for ns, dev in self.devs:
            if link.rate_mbit is not None:
                # replace: adds the qdisc, or changes the one there
                _sh("ip", "netns", "exec", ns, *self._tbf(dev, link.rate_mbit, "replace"))
            elif self._rated:
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")
        self._rated = link.rate_mbit is not None

    @staticmethod
    def _tbf(dev: str, rate_mbit: float, verb: str = "add") -> list[str]:
        # The link's rate is what TCP carries (the payload bytes SPU's counters count, what
        # the network model divides by). tbf counts whole frames: at MTU 1500 a segment
        # carries 1448 payload bytes in a 1514-byte frame (Ethernet 14, IP 20, TCP with
        # timestamps 32), so the qdisc runs that much faster.
        rate = rate_mbit * FRAME_OVERHEAD
        # burst: at least one 64 KiB GSO segment, and 2 ms at the rate (a 1 ms tick's worth
        # twice over), so the bucket never caps below the rate; latency bounds the queue.
        burst = max(128 * 1024, int(rate * 1e6 / 8 * 0.002))
        return ["tc", "qdisc", verb, "dev", dev, "root", "tbf", "rate",
                f"{rate * 1000:.0f}kbit", "burst", str(burst), "latency", "200ms"]

    def run(self, role: str, args: list[str], **popen_kw) -> subprocess.Popen:
        """Starts ``args`` on ``role``'s host; ``close`` stops it if it is still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *args],
                                start_new_session=True, **popen_kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in [*self.procs, *([self.relay] if self.relay else [])]:
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        for proc in [*self.procs, *([self.relay] if self.relay else [])]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait(10)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()

    # ------------------------------------------------------------------ fidelity

    def calibrate(self, src: str, dst: str, pings: int = 50, bulk: bool = True) -> dict:
        """Measures a round trip (``pings`` one-byte trips) and, where the link has a rate,
        one bulk transfer from ``src`` to ``dst``, through the relay as every role's traffic
        goes. The result names what was expected and whether it is within the targets:
        round trip within 1 ms of 2 x delay, rate within 5%."""
        server = self.run(dst, [*RELAY, "probe-server", "--listen",
                                f"{self.address(dst)}:{PROBE_PORT}"],
                          stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != "ready":
                raise EmulationError("the probe server did not start")
            rate = self.link.rate_mbit
            bulk_mb = min(256.0, max(8.0, rate / 8 * 2)) if (bulk and rate) else 0.0
            out = subprocess.run(
                ["ip", "netns", "exec", self.ns(src), *RELAY, "probe", "--to",
                 f"{self.address(dst)}:{PROBE_PORT}", "--pings", str(pings),
                 "--bulk-mb", str(bulk_mb)],
                capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise EmulationError(f"the probe failed: {out.stderr[-2000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            _kill_group(server, signal.SIGTERM)
            server.wait(10)
        got["path"] = f"{src} -> {dst}"
        got["rtt_ms_expected"] = 2 * self.link.delay_ms
        got["rtt_ok"] = abs(got["rtt_ms_median"] - got["rtt_ms_expected"]) <= 1.0
        if "rate_mbit" in got:
            got["rate_mbit_expected"] = rate
            got["rate_ok"] = abs(got["rate_mbit"] / rate - 1) <= 0.05
        return got


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
