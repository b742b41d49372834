"""Shared set-up of the offload net tests: a lab with agents and the HTTP app pair, a
keep-alive client, a frontend capture, and a look into the agents' pinned flow maps."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bcc.libbcc import lib as bcc_lib  # type: ignore[import-untyped]
from lab_kit import delta as delta  # re-exported: the offload tests take them from here
from lab_kit import rst_counts as rst_counts

from xo.agent.labkit import LabAgents
from xo.app import Connection, Server
from xo.datapath.datapath import default_pin_dir
from xo.datapath.layout import FlowKeyStruct
from xo.httpapp import HTTP_PORT, body, listener, response
from xo.lab import Host, Lab

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_HLEN = 14
TCP_RST = 0x04
FRAME_MAX = 65535
POLL_S = 0.1  # how often a sniffer thread looks whether it should stop
CAPTURE_RCVBUF = 1 << 24  # PortCapture must not drop payload under a burst
RST_HISTORY = 12  # frames of a flow shown before its RST
STATUS_TIMEOUT_S = 30


def pinned_flows(h: Host) -> int:
    """Entries in the flow map the agent of `h` pinned (read straight from the bpffs)."""
    path = default_pin_dir(h.ifname, h.netns) / "flows"
    fd = bcc_lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        return 0  # no pins: nothing attached, nothing left
    try:
        key, nxt = FlowKeyStruct(), FlowKeyStruct()
        if bcc_lib.bpf_get_first_key(fd, ctypes.byref(key), ctypes.sizeof(key)) != 0:
            return 0
        n = 1
        while bcc_lib.bpf_get_next_key(fd, ctypes.byref(key), ctypes.byref(nxt)) == 0:
            n += 1
            ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key))
        return n
    finally:
        os.close(fd)


def wait_settled(lab: Lab, timeout: float = 20.0) -> dict[str, int]:
    """Wait until no agent has a flow entry (every offloaded connection came back)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {h.name: pinned_flows(h) for h in [*lab.frontends, *lab.backends]}
        if not any(left.values()) or time.monotonic() > deadline:
            return {k: v for k, v in left.items() if v}
        time.sleep(0.05)


def assert_back_home(
    lab: Lab, client: Client, size: int, before: dict[str, int], *hosts: Host
) -> None:
    """The connection came back: its next request (`size` bytes) is served by f0 on the same
    connection; then no flow entry is left and no counter of rst_counts(*hosts) moved."""
    assert client.get(size)[0] == lab.frontends[0].name
    client.close()
    assert wait_settled(lab) == {}
    assert delta(before, rst_counts(*hosts)) == {}


class Client:
    """http.client (unmodified, keep-alive) in the client's namespace."""

    def __init__(self, h: Host, vip: str, timeout: float = 10.0) -> None:
        with h.enter():
            self.conn = http.client.HTTPConnection(vip, HTTP_PORT, timeout=timeout)
            self.conn.connect()

    def get(self, size: int, close: bool = False) -> tuple[str, bytes]:
        headers = {"Connection": "close"} if close else {}
        self.conn.request("GET", f"/size/{size}", headers=headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200 or data != body(size):
            raise AssertionError(
                f"/size/{size}: status {r.status}, {len(data)} bytes, exact={data == body(size)}"
            )
        return r.getheader("X-Served-By") or "", data

    def close(self) -> None:
        self.conn.close()


class Sniffer:
    """AF_PACKET on the hosts' eth0 (both directions), one thread each, until stop(): every
    IPv4 TCP frame goes to `frame(host name, ip header, tcp header and payload)`."""

    def __init__(self, *hosts: Host, rcvbuf: int | None = None) -> None:
        self._socks = []
        for h in hosts:
            with h.enter():
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.bind((h.ifname, 0))
            if rcvbuf is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(POLL_S)
            self._socks.append((h.name, s))
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n, s), daemon=True) for n, s in self._socks
        ]
        for t in self._threads:
            t.start()

    def frame(self, host: str, ip: bytes, tcp: bytes) -> None:
        raise NotImplementedError

    def _run(self, name: str, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                frame = s.recv(FRAME_MAX)
            except TimeoutError:
                continue
            except OSError:  # the lab's links went away under us: nothing more to see
                return
            if struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
                continue
            ip = frame[ETH_HLEN:]
            if ip[9] != socket.IPPROTO_TCP:
                continue
            total = struct.unpack("!H", ip[2:4])[0]
            self.frame(name, ip, ip[(ip[0] & 0x0F) * 4 : total])

    def stop_sniffing(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        for _, s in self._socks:
            s.close()


class PortCapture(Sniffer):
    """TCP payload of the IPv4 frames from port `port` on a host's eth0."""

    def __init__(self, h: Host, port: int) -> None:
        self.port = port
        self.payload = bytearray()
        super().__init__(h, rcvbuf=CAPTURE_RCVBUF)

    def frame(self, host: str, ip: bytes, tcp: bytes) -> None:
        if struct.unpack("!H", tcp[0:2])[0] == self.port:
            self.payload += tcp[(tcp[12] >> 4) * 4 :]

    def stop(self) -> bytes:
        self.stop_sniffing()
        return bytes(self.payload)


class RstSniffer(Sniffer):
    """Records every RST frame seen on the hosts' eth0 (for telling which flow it was)."""

    def __init__(self, client: Host, *hosts: Host) -> None:
        self.client = str(client.ip4)
        self.seen: list[str] = []
        self._hist: dict[tuple[str, int], list[str]] = {}
        super().__init__(*hosts)

    def frame(self, host: str, ip: bytes, tcp: bytes) -> None:
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        sport, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
        plen = len(tcp) - (tcp[12] >> 4) * 4
        line = (f"{time.monotonic():.6f} {host}: {src}:{sport} -> {dst}:{dport} "
                f"flags={tcp[13]:#x} seq={seq} ack={ack} len={plen}")
        # the client's port names the flow (the client sends from it, is sent to it)
        key = sport if src == self.client else dport
        hist = self._hist.setdefault((host, key), [])
        hist.append(line)
        del hist[:-RST_HISTORY]
        if tcp[13] & TCP_RST:
            self.seen.append("\n".join(hist))

    def stop(self) -> list[str]:
        self.stop_sniffing()
        return self.seen


def agent_status(agents: LabAgents, h: Host) -> dict[str, Any]:
    """`xo status --json` of the agent of `h`, exactly as an operator runs it."""
    out = subprocess.run([sys.executable, "-m", "xo.cli", "status", "-s",
                          agents.socket_path(h), "--json"],
                         check=True, capture_output=True, text=True, timeout=STATUS_TIMEOUT_S)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def agent_warnings(agents: LabAgents, limit: int = 30) -> str:
    """The agents' warnings and errors (for assertion messages: their tmp dirs rotate)."""
    lines = []
    for h in agents.hosts:
        path = agents.log_path(h)
        if path.exists():
            lines += [f"{h.name}: {ln}" for ln in path.read_text(errors="replace").splitlines()
                      if " WARNING " in ln or " ERROR " in ln or "Error" in ln]
    return "\n".join(lines[-limit:])


@contextlib.contextmanager
def lab_with_agents(
    workdir: Path, backends: int = 2, prepare: Callable[[LabAgents], None] | None = None
) -> Iterator[tuple[Lab, LabAgents]]:
    """A lab (c0, f0, `backends` backends) with a running agent per host; `prepare` may
    change the agents' configs or settings before they start."""
    with Lab(clients=1, frontends=1, backends=backends) as lab:
        agents = LabAgents(lab, workdir, verbose=True)
        if prepare is not None:
            prepare(agents)
        agents.start()
        try:
            yield lab, agents
        finally:
            agents.stop()


class Holder:
    """A target app that keeps each handed-in connection until the test acts on it."""

    def __init__(self, h: Host, agents: LabAgents, port: int = HTTP_PORT + 1) -> None:
        self.name = h.name
        self.server = Server(listener(h, str(h.ip4), port), agents.socket_path(h), "http")
        self.got: queue.Queue[Connection] = queue.Queue()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = self.server.accept(timeout=0.1)  # an agent restart does not end it
            if conn is not None:
                self.got.put(conn)

    def take(self) -> Connection:
        return self.got.get(timeout=10)

    def serve_and_give_back(self, conn: Connection, client: Client, size: int) -> None:
        """Answer the client's pending request from here (`size` bytes, byte-exact at the
        client), then give the connection back to its owner."""
        assert conn.sock is not None
        conn.sock.sendall(response(size, self.name, True))
        assert client.conn.getresponse().read() == body(size)
        self.server.give_back(conn.sock, conn.handoff_id)
        conn.sock.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._t.join()
        self.server.close()
