"""Hosts for the local cloud: each cluster node its own network namespace on a bridge.

On a cloud every node is its own machine: its own address, its own loopback, reachable from
other clusters only on the ports its `resources.ports` opens, while the nodes of one cluster
reach each other on every port (SkyPilot puts them in one security group / firewall rule).
A `Network` makes that on this machine, as root:

- a bridge `vsky<k>` holding 198.18.<k>.1/24, the host side (the tests' bucket servers listen
  there); 198.18.0.0/15 is set aside for benchmarking networks (RFC 2544), so nothing real is
  ever addressed;
- per node, a namespace with a veth pair on the bridge and the next address of the /24, and no
  route but the bridge's (no default route: nothing leaves it);
- in each namespace an nftables input chain that drops what is neither on its loopback, an
  answer to its own connection, from a node of its cluster, nor to a port the task declares.

`capture()` records every frame the bridge's ports carry and puts each TCP stream back
together, so a test can show what crossed the "network" in clear.

Without root, `ip` or `nft`, `Network.make` raises `HostsUnavailable` with the reason in one
line, and the local cloud runs every node on this machine's loopback instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass, field

from vicuna_sky.errors import VicunaSkyError

SUBNET = "198.18"
"""The first two octets of every address here (198.18.0.0/15, RFC 2544's benchmarking range)."""
_MAX_HOSTS = 253  # .2 .. .254 of a /24


class HostsUnavailable(VicunaSkyError):
    """Namespaces cannot be made here: the local cloud falls back to loopback."""


def unavailable_reason() -> str:
    """Why this machine cannot make hosts ("" when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2, nftables)"
    return ""


@dataclass(frozen=True)
class Host:
    """One node: a namespace and its address on the bridge."""

    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host (the process sees only its network)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class Network:
    """A bridge and the hosts on it; `close()` (or the `with` block's end) removes them all."""

    index: int
    hosts: list[Host] = field(default_factory=list)
    _made: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Clusters come up from several threads at once (a fleet's jobs): one number each."""

    @classmethod
    def make(cls) -> Network:
        """A new bridge on the first free 198.18.<k>.0/24: the bridge's name is the lock, so
        networks made side by side (two test workers) never share a subnet."""
        reason = unavailable_reason()
        if reason:
            raise HostsUnavailable(f"the local cloud runs on loopback: {reason}")
        for k in range(1, 256):
            made = subprocess.run(
                ["ip", "link", "add", f"vsky{k}", "type", "bridge"],
                capture_output=True,
                text=True,
            )
            if made.returncode == 0:
                net = cls(index=k)
                try:
                    net._clear_stale_links()
                    _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
                    _ip("link", "set", net.bridge, "up")
                except BaseException:
                    net.close()
                    raise
                return net
        raise HostsUnavailable("the local cloud runs on loopback: no free bridge vsky1..255")

    def _clear_stale_links(self) -> None:
        """Veths an earlier network of this number left (the kernel frees a deleted namespace
        and its veth end in the background, so a quick successor could meet them)."""
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(f"{self.bridge}h"):
                subprocess.run(["ip", "link", "del", name], capture_output=True)

    @property
    def bridge(self) -> str:
        return f"vsky{self.index}"

    @property
    def gateway(self) -> str:
        """This machine's address on the bridge: where the nodes reach the bucket servers."""
        return f"{SUBNET}.{self.index}.1"

    def add_cluster(self, nodes: int, ports: list[str]) -> list[Host]:
        """`nodes` new hosts that reach each other on every port and the others only on
        `ports` (a cluster's `resources.ports`: "8000" or a range "10000-10010")."""
        hosts = [self._add_host() for _ in range(nodes)]
        try:
            for host in hosts:
                _nft(host, _ruleset([h.address for h in hosts], ports))
        except BaseException:
            self.remove(hosts)
            raise
        return hosts

    def remove(self, hosts: list[Host]) -> None:
        """Take hosts off the bridge, as a cloud takes VMs away: their processes are killed."""
        for host in hosts:
            # The VM is gone, and every process on it: a namespace with a process left in it
            # would live on, unreachable.
            pids = subprocess.run(
                ["ip", "netns", "pids", host.namespace], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
            with self._lock, contextlib.suppress(ValueError):
                self.hosts.remove(host)

    def close(self) -> None:
        self.remove(list(self.hosts))
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def capture(self) -> Capture:
        return Capture(self)

    def _add_host(self) -> Host:
        with self._lock:
            if self._made >= _MAX_HOSTS:
                raise VicunaSkyError(f"network {self.bridge}: all {_MAX_HOSTS} addresses used")
            n = self._made
            self._made += 1
            host = Host(f"{self.bridge}-{n}", f"{SUBNET}.{self.index}.{n + 2}")
            self.hosts.append(host)
        outside, inside = f"{self.bridge}h{n}", f"{self.bridge}n{n}"
        _ip("netns", "add", host.namespace)
        try:
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("link", "set", inside, "netns", host.namespace)
            ns = ["-n", host.namespace]
            _ip(*ns, "link", "set", inside, "name", "eth0")
            _ip(*ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip(*ns, "link", "set", "eth0", "up")
            _ip(*ns, "link", "set", "lo", "up")
        except BaseException:
            self.remove([host])
            raise
        return host


def _ruleset(peers: list[str], ports: list[str]) -> str:
    rules = [
        'iif "lo" accept',
        "ct state established,related accept",
        f"ip saddr {{ {', '.join(peers)} }} accept",
    ]
    if ports:
        rules.append(f"tcp dport {{ {', '.join(sorted(set(ports)))} }} accept")
    body = "\n    ".join(rules)
    return (
        "table inet vsky {\n  chain input {\n"
        "    type filter hook input priority 0; policy drop;\n"
        f"    {body}\n  }}\n}}\n"
    )


def _nft(host: Host, ruleset: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", host.namespace, "nft", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise VicunaSkyError(f"nft in {host.namespace}: {done.stderr.strip()}")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise VicunaSkyError(f"ip {' '.join(args)}: {done.stderr.strip()}")


# ---------------------------------------------------------------------------------- capture

_ETH_P_ALL = 0x0003
_SEQ_SPACE = 1 << 32


class Capture:
    """Every frame on the bridge's ports while the `with` block runs (a raw packet socket on
    this machine's side of each veth: frames between two namespaces cross the bridge without
    passing its own interface)."""

    def __init__(self, network: Network) -> None:
        self.prefix = f"{network.bridge}h"
        self.frames: list[bytes] = []
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        self._sock.settimeout(0.2)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                frame, where = self._sock.recvfrom(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if where[0].startswith(self.prefix):
                self.frames.append(frame)

    def streams(self) -> dict[tuple[str, int, str, int], bytes]:
        """Each TCP stream's bytes in order, by (source, port, destination, port). A frame
        seen on two veths (out of one namespace, into another) counts once."""
        segments: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
        starts: dict[tuple[str, int, str, int], int] = {}
        for frame in self.frames:
            parsed = _tcp(frame)
            if parsed is None:
                continue
            flow, seq, syn, payload = parsed
            if syn:
                starts[flow] = (seq + 1) % _SEQ_SPACE
            if payload:
                kept = segments.setdefault(flow, {})
                if len(payload) > len(kept.get(seq, b"")):
                    kept[seq] = payload
        out = {}
        for flow, kept in segments.items():
            base = starts.get(flow, min(kept))
            data = bytearray()
            for seq, payload in sorted(kept.items(), key=lambda s: (s[0] - base) % _SEQ_SPACE):
                offset = (seq - base) % _SEQ_SPACE
                if offset > len(data):  # a segment not seen: keep the others' places
                    data += bytes(offset - len(data))
                if offset + len(payload) > len(data):  # a retransmission adds only what is new
                    data += payload[len(data) - offset :]
            out[flow] = bytes(data)
        return out


def _tcp(frame: bytes) -> tuple[tuple[str, int, str, int], int, bool, bytes] | None:
    """(flow, sequence number, SYN, payload) of an Ethernet frame holding IPv4 TCP."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    header = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    if ip[9] != 6 or len(ip) < header + 20:
        return None
    tcp = ip[header:total]
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    offset = (tcp[12] >> 4) * 4
    flow = (socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport)
    return flow, seq, bool(tcp[13] & 0x02), bytes(tcp[offset:])
