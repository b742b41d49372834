"""The eBPF datapath on real packets in a lab: BLOCK, REDIRECT, SNAT, counters, restart,
detach, bad input, and a live TCP connection moved from frontend to backend with xo.tcp."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xo.datapath import (
    Action,
    BlockFreezer,
    Datapath,
    DatapathError,
    DatapathPermissionError,
    Direction,
    FlowTableFull,
    InterfaceNotFound,
    Redirect,
    UnknownFlow,
)
from xo.datapath.program import PIN_ROOT
from xo.flow import Endpoint, FlowError, FlowKey
from xo.freeze import inbound_flow
from xo.lab import Host, Lab

pytestmark = pytest.mark.net

ETH_P_ALL = 0x0003
ETH_HLEN = 14
IPPROTO_TCP = 6
PAYLOAD = bytes(range(256)) * 256  # 64 KiB, every byte value, position-dependent
RETRANSMIT_WAIT_S = 0.7  # > the first RTO (200 ms) + its doubled retry
DEADLINE_S = 10.0
HPORT = 47000  # backend handoff ports used by these tests
VPORT = 8000  # VIP ports
LIVE_TOTAL = 400_000  # bytes the live client streams (and expects echoed)
MIN_FRAMES = 10  # frames each way a DSR echo of PAYLOAD must at least take


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(clients=1, frontends=1, backends=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def dp_f(lab: Lab) -> Iterator[Datapath]:
    with Datapath.attach("eth0", netns=lab.frontends[0].netns) as dp:
        yield dp


@pytest.fixture(scope="module")
def dp_b(lab: Lab) -> Iterator[Datapath]:
    with Datapath.attach("eth0", netns=lab.backends[0].netns) as dp:
        yield dp


# --- helpers ---------------------------------------------------------------------------------
def ip_of(h: Host, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return h.ip4 if family == 4 else h.ip6


def vip_of(lab: Lab, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return lab.vip4 if family == 4 else lab.vip6


def af(family: int) -> socket.AddressFamily:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def listen(h: Host, ep: Endpoint) -> socket.socket:
    with h.enter():
        srv = socket.socket(af(ep.family), socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(ep.sockaddr())
        srv.listen()
    srv.settimeout(DEADLINE_S)
    return srv


def connect(h: Host, local: Endpoint, remote: Endpoint) -> socket.socket:
    with h.enter():
        s = socket.socket(af(local.family), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(local.sockaddr())
        s.settimeout(DEADLINE_S)
        s.connect(remote.sockaddr())
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def rsts(*hosts: Host) -> dict[str, int]:
    return {h.name: h.nstat()["TcpOutRsts"] for h in hosts}


def csum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class Capture:
    """AF_PACKET capture on a host's eth0 (both directions), for checking rewritten frames."""

    def __init__(self, h: Host) -> None:
        with h.enter():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((h.ifname, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.setblocking(False)

    def tcp_frames(self) -> list[dict]:
        """Every TCP frame received so far, parsed, with its checksums verified."""
        out = []
        while True:
            try:
                frame, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            parsed = parse_tcp_frame(frame)
            if parsed:
                out.append(parsed)
        self.sock.close()
        return out


def parse_tcp_frame(frame: bytes) -> dict | None:
    dst_mac, src_mac, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    ip = frame[ETH_HLEN:]
    if ethertype == 0x0800:
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != IPPROTO_TCP:
            return None
        src, dst = ipaddress.IPv4Address(ip[12:16]), ipaddress.IPv4Address(ip[16:20])
        tcp = ip[ihl:total]
        ip_ok = csum16(ip[:ihl]) == 0xFFFF
        pseudo = ip[12:20] + struct.pack("!BBH", 0, IPPROTO_TCP, len(tcp))
    elif ethertype == 0x86DD:
        plen = struct.unpack("!H", ip[4:6])[0]
        if ip[6] != IPPROTO_TCP:
            return None
        src, dst = ipaddress.IPv6Address(ip[8:24]), ipaddress.IPv6Address(ip[24:40])
        tcp = ip[40 : 40 + plen]
        ip_ok = True
        pseudo = ip[8:40] + struct.pack("!IxxxB", len(tcp), IPPROTO_TCP)
    else:
        return None
    sport, dport = struct.unpack("!HH", tcp[:4])
    return {
        "src": Endpoint(src, sport),
        "dst": Endpoint(dst, dport),
        "src_mac": ":".join(f"{b:02x}" for b in src_mac),
        "dst_mac": ":".join(f"{b:02x}" for b in dst_mac),
        "ip_ok": ip_ok,
        "tcp_ok": csum16(pseudo + tcp) == 0xFFFF,
        "rst": bool(tcp[13] & 0x04),
        "len": len(tcp),
    }


def echo_until_eof(conn: socket.socket) -> int:
    """Echo everything back until the peer shuts down, then close; returns the byte count."""
    n = 0
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
            n += len(data)
    return n


def echo_via(c: Host, srv: socket.socket, client: Endpoint, vip: Endpoint, data: bytes) -> None:
    """The client at `client` connects to `vip` and streams data; whatever serves `srv` (the
    rules decide the path) echoes it: the peer is the client itself, the echo byte-exact."""
    s = connect(c, client, vip)
    conn, peer = srv.accept()
    assert Endpoint(ipaddress.ip_address(peer[0]), peer[1]) == client
    assert s.getpeername()[:2] == vip.sockaddr()
    t = threading.Thread(target=echo_until_eof, args=(conn,))
    t.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    assert recv_exactly(s, len(data) + 1) == data, "echo through DSR not byte-exact"
    t.join(DEADLINE_S)
    s.close()


def assert_dsr_frames(
    cap_b: Capture, cap_c: Capture, flow_b: FlowKey, vip: Endpoint, f: Host, b: Host, how: str
) -> int:
    """What the captures on the backend and the client saw of flow_b (client -> handoff):
    REDIRECT rewrote dst MAC/IP/port and src MAC, the source rewrite made the backend's replies
    come from the VIP, every checksum right, no RST; returns the frames redirected to b."""
    client, handoff = flow_b.client, flow_b.vip
    to_b = [p for p in cap_b.tcp_frames() if p["src"] == client]
    to_c = [p for p in cap_c.tcp_frames() if p["dst"] == client]
    assert len(to_b) >= MIN_FRAMES and len(to_c) >= MIN_FRAMES
    for p in to_b:
        assert p["dst"] == handoff and p["dst_mac"] == b.mac and p["src_mac"] == f.mac
        assert p["ip_ok"] and p["tcp_ok"], f"bad checksum after {how} REDIRECT: {p}"
    for p in to_c:
        assert p["src"] == vip and p["src_mac"] == b.mac
        assert p["ip_ok"] and p["tcp_ok"], f"bad checksum after {how} SNAT: {p}"
    assert not any(p["rst"] for p in to_b + to_c)
    return len(to_b)


# --- BLOCK / PASS / unknown flows -------------------------------------------------------------
def test_block_drops_client_retransmits_no_rst_and_remove_restores(
    lab: Lab, dp_f: Datapath
) -> None:
    c, f = lab.clients[0], lab.frontends[0]
    vip = Endpoint(lab.vip4, VPORT + 1)
    flow = FlowKey(Endpoint(c.ip4, 40001), vip)
    other = FlowKey(Endpoint(c.ip4, 40002), vip)
    srv = listen(f, vip)
    s = connect(c, flow.client, vip)
    conn, _ = srv.accept()
    s2 = connect(c, other.client, vip)
    conn2, _ = srv.accept()
    before_rst, before_c = rsts(c, f), c.nstat()
    before = dp_f.counters()
    try:
        dp_f.block(flow)
        s.sendall(b"held back")
        assert select.select([conn], [], [], RETRANSMIT_WAIT_S)[0] == [], "BLOCK let data in"
        # The unknown flow of the same client and VIP is untouched meanwhile.
        s2.sendall(b"free")
        assert recv_exactly(conn2, 4) == b"free"
        st = dp_f.stats(flow)
        assert st.packets >= 2, "the client must have retransmitted into the block"
        assert c.nstat()["TcpRetransSegs"] > before_c["TcpRetransSegs"]
        blocked = dp_f.counters()["blocked"] - before["blocked"]
        assert st.packets <= blocked <= dp_f.stats(flow).packets  # retransmits keep coming
        with pytest.raises(UnknownFlow):
            dp_f.stats(other)
        (entry,) = [e for e in dp_f.flows() if e.flow == flow]
        assert (entry.action, entry.direction) == (Action.BLOCK, Direction.INGRESS)
        assert dp_f.remove(flow) is True
        assert dp_f.remove(flow) is False
        assert recv_exactly(conn, 9) == b"held back", "remove must restore delivery"
    finally:
        dp_f.remove(flow)
        for x in (s, s2, conn, conn2, srv):
            x.close()
    assert rsts(c, f) == before_rst


def test_allow_counts_without_changing_delivery(lab: Lab, dp_f: Datapath) -> None:
    c, f = lab.clients[0], lab.frontends[0]
    vip = Endpoint(lab.vip6, VPORT + 2)
    flow = FlowKey(Endpoint(c.ip6, 40003), vip)
    srv = listen(f, vip)
    dp_f.allow(flow)
    passed = dp_f.counters()["passed"]
    try:
        s = connect(c, flow.client, vip)
        conn, peer = srv.accept()
        s.sendall(PAYLOAD)
        assert recv_exactly(conn, len(PAYLOAD)) == PAYLOAD
        st = dp_f.stats(flow)
        assert st.packets >= 3 and st.bytes > len(PAYLOAD)
        assert st.packets <= dp_f.counters()["passed"] - passed <= dp_f.stats(flow).packets
    finally:
        dp_f.remove(flow)
        s.close()
        conn.close()
        srv.close()


# --- REDIRECT + SNAT (direct server return) ---------------------------------------------------
@pytest.mark.parametrize("family", [4, 6])
def test_redirect_and_snat_deliver_with_valid_checksums(
    lab: Lab, dp_f: Datapath, dp_b: Datapath, family: int
) -> None:
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    vip = Endpoint(vip_of(lab, family), VPORT + 3)
    client = Endpoint(ip_of(c, family), 40004)
    handoff = Endpoint(ip_of(b, family), HPORT + 3)
    flow_f, flow_b = FlowKey(client, vip), FlowKey(client, handoff)
    srv = listen(b, handoff)  # nothing listens on f0: a missed redirect would draw an RST
    cap_b, cap_c = Capture(b), Capture(c)
    before_rst = rsts(c, f, b)
    before_f, before_b = dp_f.counters(), dp_b.counters()
    dp_f.redirect(flow_f, Redirect(handoff, mac=b.mac))
    dp_b.snat(flow_b, vip)
    try:
        echo_via(c, srv, client, vip, PAYLOAD)
        wait_closed(b, handoff)
    finally:
        dp_f.remove(flow_f)
        dp_b.remove(flow_b)
        srv.close()
    redirected = assert_dsr_frames(cap_b, cap_c, flow_b, vip, f, b, "eBPF")
    assert rsts(c, f, b) == before_rst
    after_f, after_b = dp_f.counters(), dp_b.counters()
    assert after_f["redirected"] - before_f["redirected"] >= redirected
    assert after_b["snatted"] - before_b["snatted"] >= 1
    assert after_f["errors"] == before_f["errors"] and after_b["errors"] == before_b["errors"]


def set_offloads(lab: Lab, state: str) -> None:
    for h in lab.hosts:
        h.run(["ethtool", "-K", h.ifname, "tx", state, "rx", state])
        subprocess.run(
            ["ip", "netns", "exec", lab.bridge_netns, "ethtool", "-K", h.name, "tx", state],
            check=True,
            capture_output=True,
        )


@pytest.mark.parametrize("family", [4, 6])
def test_redirect_and_snat_with_offloads_on(
    lab: Lab, dp_f: Datapath, dp_b: Datapath, family: int
) -> None:
    """Checksum offload and GSO on: the rewrites must keep CHECKSUM_PARTIAL super-packets right
    (the receiving stacks verify every checksum; a wrong one shows as TcpInCsumErrors)."""
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    vip = Endpoint(vip_of(lab, family), VPORT + 6)
    client = Endpoint(ip_of(c, family), 40007)
    handoff = Endpoint(ip_of(b, family), HPORT + 6)
    flow_f, flow_b = FlowKey(client, vip), FlowKey(client, handoff)
    srv = listen(b, handoff)
    before_rst = rsts(c, f, b)
    before_csum = [h.nstat().get("TcpInCsumErrors", 0) for h in (c, b)]
    set_offloads(lab, "on")
    dp_f.redirect(flow_f, Redirect(handoff, mac=b.mac))
    dp_b.snat(flow_b, vip)
    try:
        echo_via(c, srv, client, vip, PAYLOAD * 8)
        wait_closed(b, handoff)
    finally:
        dp_f.remove(flow_f)
        dp_b.remove(flow_b)
        srv.close()
        set_offloads(lab, "off")
    assert rsts(c, f, b) == before_rst
    assert [h.nstat().get("TcpInCsumErrors", 0) for h in (c, b)] == before_csum


def wait_closed(h: Host, local: Endpoint) -> None:
    """Until no socket but the listener uses `local` (LAST_ACK done): then rules may go."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        out = h.run(["ss", "-Htan", "sport", f"= :{local.port}"]).stdout.split("\n")
        if not [line for line in out if line and not line.startswith("LISTEN")]:
            return
        time.sleep(0.02)
    raise AssertionError(f"connections on {local} in {h.name} did not close")


# --- a live connection moved frontend -> backend with xo.tcp ----------------------------------
CLIENT = r"""
import json, socket, sys, threading, time
family, host, port, total, chunk, pace = sys.argv[1:]
total, chunk, pace = int(total), int(chunk), float(pace)
data = bytes((i * 7 + i // 251) & 0xFF for i in range(total))
s = socket.socket(socket.AF_INET if family == "4" else socket.AF_INET6)
s.settimeout(20)
s.connect((host, int(port)))
got = bytearray()
def reader():
    while chunk_in := s.recv(65536):
        got.extend(chunk_in)
t = threading.Thread(target=reader)
t.start()
for i in range(0, total, chunk):
    s.sendall(data[i:i + chunk])
    time.sleep(pace)
s.shutdown(socket.SHUT_WR)
t.join()
s.close()
print(json.dumps({"sent": total, "received": len(got), "exact": bytes(got) == data}))
"""


def start_client(c: Host, vip: Endpoint, total: int) -> subprocess.Popen[str]:
    """The unmodified client: a plain socket streaming `total` bytes, checking the echo."""
    chunk, pace = 4000, 0.004  # ~1 MB/s: the moves happen mid-stream
    argv = [sys.executable, "-c", CLIENT, str(vip.family), str(vip.ip), str(vip.port)]
    return c.popen([*argv, str(total), str(chunk), str(pace)], stdout=subprocess.PIPE, text=True)


def echo_some(sock: socket.socket, n: int) -> int:
    """Echo at least n bytes (what one recv brings may overshoot); returns the count."""
    done = 0
    while done < n:
        data = sock.recv(65536)
        if not data:
            raise AssertionError("client closed early")
        sock.sendall(data)
        done += len(data)
    return done


def move_to_backend(
    lab: Lab, dp_f: Datapath, dp_b: Datapath, conn: socket.socket, handoff: Endpoint
) -> socket.socket:
    """Frontend -> backend: BLOCK, capture, release, SNAT, restore on handoff, REDIRECT."""
    from xo import tcp

    b = lab.backends[0]
    flow = inbound_flow(conn)
    BlockFreezer(dp_f).freeze(flow)
    state = tcp.capture(conn)
    tcp.release(conn)
    dp_b.snat(FlowKey(flow.client, handoff), flow.vip)
    with b.enter():
        moved = tcp.restore(state, local=handoff)
    dp_f.redirect(flow, Redirect(handoff, mac=b.mac))
    BlockFreezer(dp_f).thaw(flow)  # a no-op now: the redirect replaced the block
    assert [e.action for e in dp_f.flows() if e.flow == flow] == [Action.REDIRECT]
    moved.settimeout(DEADLINE_S)
    return moved


def move_back(
    lab: Lab, dp_f: Datapath, dp_b: Datapath, moved: socket.socket, vip: Endpoint
) -> socket.socket:
    """Backend -> frontend: BLOCK on the backend (client -> handoff, as F rewrote it),
    capture, release, restore on the frontend as VIP:vport, then drop F's REDIRECT and B's
    entries."""
    from xo import tcp

    back_flow = inbound_flow(moved)  # client -> handoff
    BlockFreezer(dp_b).freeze(back_flow)
    state = tcp.capture(moved)
    tcp.release(moved)
    with lab.frontends[0].enter():
        home = tcp.restore(state, local=vip)
    assert dp_f.remove(FlowKey(back_flow.client, vip))
    assert dp_b.remove(back_flow)  # the BLOCK (ingress) and the SNAT (egress)
    assert dp_b.flows() == []
    home.settimeout(DEADLINE_S)
    return home


@dataclass
class Live:
    """A client connection the frontend app accepted on `flow`, to be moved to `handoff`."""

    conn: socket.socket
    flow: FlowKey
    handoff: Endpoint
    echoed: int = 0


@contextlib.contextmanager
def live_connection(
    lab: Lab, dp_f: Datapath, dp_b: Datapath, family: int, offset: int
) -> Iterator[Live]:
    """The unmodified client streams LIVE_TOTAL bytes to VIP:VPORT+offset; f0's app accepts it
    and the test echoes (`echoed` counts) and moves it to b0:HPORT+offset. Then: the client got
    every byte back exactly, nothing was reset, no rule is left."""
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    vip = Endpoint(vip_of(lab, family), VPORT + offset)
    handoff = Endpoint(ip_of(b, family), HPORT + offset)
    srv = listen(f, vip)
    before_rst = rsts(c, f, b)
    client = start_client(c, vip, LIVE_TOTAL)
    conn, _ = srv.accept()
    live = Live(conn, inbound_flow(conn), handoff)
    try:
        yield live
        out, _ = client.communicate(timeout=DEADLINE_S * 2)
        wait_closed(b, handoff)
        wait_closed(f, vip)
    finally:
        if client.poll() is None:  # the test failed first: leave no client behind
            client.kill()
            client.wait()
        dp_f.remove(live.flow)
        dp_b.remove(FlowKey(live.flow.client, handoff))
        srv.close()
    assert json.loads(out) == {"sent": LIVE_TOTAL, "received": LIVE_TOTAL, "exact": True}
    assert client.returncode == 0 and live.echoed == LIVE_TOTAL
    assert rsts(c, f, b) == before_rst, "a move must not reset anything"


@pytest.mark.parametrize("family", [4, 6])
def test_live_connection_moves_frontend_to_backend(
    lab: Lab, dp_f: Datapath, dp_b: Datapath, family: int
) -> None:
    """BLOCK -> capture -> restore on b0:hport -> SNAT + REDIRECT; unmodified client."""
    with live_connection(lab, dp_f, dp_b, family, 4) as live:
        assert live.flow.vip == Endpoint(vip_of(lab, family), VPORT + 4)
        # the frontend app serves a while, then hands over
        live.echoed = echo_some(live.conn, LIVE_TOTAL // 4)
        moved = move_to_backend(lab, dp_f, dp_b, live.conn, live.handoff)
        live.echoed += echo_until_eof(moved)


@pytest.mark.parametrize("family", [4, 6])
def test_live_connection_goes_to_backend_and_back(
    lab: Lab, dp_f: Datapath, dp_b: Datapath, family: int
) -> None:
    """F -> B -> F mid-stream: the return path blocks on the backend's ingress key."""
    with live_connection(lab, dp_f, dp_b, family, 7) as live:
        live.echoed = echo_some(live.conn, LIVE_TOTAL // 4)
        moved = move_to_backend(lab, dp_f, dp_b, live.conn, live.handoff)
        live.echoed += echo_some(moved, LIVE_TOTAL // 4)
        home = move_back(lab, dp_f, dp_b, moved, live.flow.vip)
        assert inbound_flow(home) == live.flow
        live.echoed += echo_until_eof(home)


# --- restart, detach, bad input ---------------------------------------------------------------
def filters(h: Host) -> str:
    return "".join(
        h.run(["tc", "filter", "show", "dev", h.ifname, hook]).stdout
        for hook in ("ingress", "egress")
    )


def test_restart_keeps_flows_and_detach_is_clean(lab: Lab) -> None:
    c, b = lab.clients[0], lab.backends[1]
    local = Endpoint(b.ip4, VPORT + 5)
    flow = FlowKey(Endpoint(c.ip4, 40005), local)
    srv = listen(b, local)
    s = connect(c, flow.client, local)
    conn, _ = srv.accept()
    dp = Datapath.attach("eth0", netns=b.netns, max_flows=4)
    try:
        assert not dp.reattached and "xo_ingress" in filters(b) and "xo_egress" in filters(b)
        dp.block(flow)
        s.sendall(b"x")
        time.sleep(0.3)
        held = dp.stats(flow).packets
        assert held >= 1
        dp.close()  # the agent "dies": filter and pinned maps stay, the flow stays blocked
        assert "xo_ingress" in filters(b)
        assert select.select([conn], [], [], RETRANSMIT_WAIT_S)[0] == []
        with pytest.raises(DatapathError, match="holds 4 flows, not 65536"):
            Datapath.attach("eth0", netns=b.netns)  # a resize would drop the flows: refused
        assert "xo_ingress" in filters(b)
        dp = Datapath.attach("eth0", netns=b.netns, max_flows=4)
        assert dp.reattached
        assert [(e.flow, e.action) for e in dp.flows()] == [(flow, Action.BLOCK)]
        assert dp.stats(flow).packets > held, "counters survive the restart and keep counting"
        # The map is full at max_flows: a clear error, and the table is unchanged.
        for port in (41001, 41002, 41003):
            dp.block(FlowKey(Endpoint(c.ip4, port), local))
        with pytest.raises(FlowTableFull, match="full"):
            dp.block(FlowKey(Endpoint(c.ip4, 41004), local))
        assert len(dp.flows()) == 4
        assert dp.remove(flow)
        assert recv_exactly(conn, 1) == b"x"
    finally:
        pin_dir = dp.pin_dir
        dp.detach()
        for x in (s, conn, srv):
            x.close()
    assert filters(b) == ""
    assert "clsact" not in b.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert not pin_dir.exists()
    with pytest.raises(DatapathError, match="detached"):
        dp.flows()


def test_bad_input_is_rejected_clearly(lab: Lab, dp_f: Datapath, tmp_path: Path) -> None:
    c = lab.clients[0]
    flow4 = FlowKey(Endpoint(c.ip4, 40006), Endpoint(lab.vip4, VPORT))
    with pytest.raises(InterfaceNotFound, match="no interface 'nosuch0'"):
        Datapath.attach("nosuch0", netns=c.netns)
    with pytest.raises(InterfaceNotFound, match="no network namespace"):
        Datapath.attach("eth0", netns=f"{lab.name}-zz")
    with pytest.raises(DatapathError, match="not on a bpffs"):
        Datapath.attach("eth0", netns=c.netns, pin_dir=tmp_path / "pins")
    with pytest.raises(FlowError, match="expected xo.flow.FlowKey"):
        dp_f.block(("198.18.0.100", 1, "198.18.0.1", 2))  # type: ignore[arg-type]
    with pytest.raises(FlowError, match="redirect of IPv4 flow"):
        dp_f.redirect(flow4, Redirect(Endpoint(c.ip6, 1), mac=c.mac))
    with pytest.raises(FlowError, match="not a MAC address"):
        Redirect(Endpoint(c.ip4, 1), mac="02:78:6f")
    with pytest.raises(FlowError, match="source rewrite of IPv4 flow"):
        dp_f.snat(flow4, Endpoint(lab.vip6, 80))
    with pytest.raises(UnknownFlow, match="has no entry"):
        dp_f.stats(flow4)
    assert dp_f.flows() == [] or all(e.flow != flow4 for e in dp_f.flows())
    # Unprivileged: a clear error before anything is loaded.
    code = "from xo.datapath import Datapath; Datapath.attach('lo')"
    p = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert p.returncode != 0
    assert f"{DatapathPermissionError.__name__}: attaching the datapath needs root" in p.stderr


def test_pins_live_under_the_xo_bpffs(dp_f: Datapath, lab: Lab) -> None:
    assert dp_f.pin_dir == PIN_ROOT / lab.frontends[0].netns / "eth0"
    assert sorted(p.name for p in dp_f.pin_dir.iterdir()) == ["counters", "flows", "stats"]


def test_lab_down_releases_pins_of_a_datapath_never_detached() -> None:
    """An agent killed without detach leaves pins; removing its lab must not leak them."""
    lab = Lab(clients=1, frontends=0, backends=0).up()
    try:
        dp = Datapath.attach("eth0", netns=lab.clients[0].netns)
        pin_dir = dp.pin_dir
        dp.close()
        assert (pin_dir / "flows").exists()
    finally:
        lab.down()
    assert not pin_dir.exists() and not pin_dir.parent.exists()
