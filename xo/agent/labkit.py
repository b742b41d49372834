"""Agents for a lab: certificates, one config per host, one `xo agent` process per host.

Used by the demo, the net tests and the protocol benchmark, so all three run the real daemon
the same way an operator would (`xo agent -c FILE`), in the host's network namespace
(config key `netns`; the process stays in the root mount namespace so the datapath's pinned
maps outlive an agent restart).

    with Lab(clients=1, frontends=1, backends=2) as lab, LabAgents(lab, tmpdir) as agents:
        agents.socket_path(lab.frontends[0])      # the local app API of f0
        agents.restart(lab.frontends[0])          # kill + start again (reconciliation)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from xo.agent.config import AgentConfig, HandoffRange, LocalApi, Peer, dumps
from xo.lab import Host, Lab
from xo.pki import DevCA

GRPC_PORT = 7000
HANDOFF_PORTS = (40000, 40999)
START_TIMEOUT_S = 60.0  # BCC compiles for ~0.5 s idle, many seconds on a loaded box
STOP_TIMEOUT_S = 30.0  # a graceful stop detaches TC programs: seconds on a loaded box


class AgentStartError(RuntimeError):
    """An agent process exited or stayed silent instead of reporting ready."""


class LabAgents:
    """One agent per frontend and backend of `lab`; files under `workdir`."""

    def __init__(self, lab: Lab, workdir: Path, handoff_timeout_ms: int = 1000,
                 verbose: bool = False, hw_rules: bool = False,
                 start_timeout: float = START_TIMEOUT_S) -> None:
        self.lab = lab
        self.workdir = workdir
        self.verbose = verbose
        self.start_timeout = start_timeout  # the VM tier (TCG) compiles BCC programs slowly
        # False: a SIGTERM'd agent keeps its datapath and flows (restart/upgrade tests)
        self.detach_on_exit = True
        self.hosts = [*lab.frontends, *lab.backends]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.configs: dict[str, Path] = {}
        self.ca = DevCA()  # tests issue extra identities (a stranger) from it
        tls = {h.name: self.ca.write(workdir / "pki", h.name) for h in self.hosts}
        for h in self.hosts:
            # frontends talk to backends and back; hosts of the same role need not know each other
            peers = [p for p in self.hosts if (h in lab.frontends) != (p in lab.frontends)]
            cfg = AgentConfig(
                name=h.name,
                interface=h.ifname,
                listen=f"{h.ip4}:{GRPC_PORT}",
                netns=h.netns,
                vips=(lab.vip4, lab.vip6) if h is lab.frontends[0] else (),
                handoff=HandoffRange((h.ip4, h.ip6), *HANDOFF_PORTS),
                tls=tls[h.name],
                local=LocalApi(workdir / f"{h.name}.sock", 0o600),
                peers=tuple(Peer(p.name, f"{p.ip4}:{GRPC_PORT}", p.name) for p in peers),
                handoff_timeout_ms=handoff_timeout_ms,
                hw_rules=hw_rules,
            )
            path = workdir / f"{h.name}.toml"
            path.write_text(dumps(cfg))
            self.configs[h.name] = path

    def socket_path(self, h: Host) -> str:
        return str(self.workdir / f"{h.name}.sock")

    def timings_path(self, h: Host) -> Path:
        return self.workdir / f"{h.name}.timings.jsonl"

    def log_path(self, h: Host) -> Path:
        return self.workdir / f"{h.name}.log"

    def start(self, h: Host | None = None) -> None:
        """Start the agent of `h` (default: all) and wait until it serves."""
        for host in [h] if h else self.hosts:
            argv = [sys.executable, "-m", "xo.cli", "agent", "-c", str(self.configs[host.name]),
                    "--timings", str(self.timings_path(host))]
            if self.detach_on_exit:
                argv.append("--detach-on-exit")
            if self.verbose:
                argv.append("-v")
            log = self.log_path(host).open("ab")
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
            log.close()
            self.procs[host.name] = p
        for host in [h] if h else self.hosts:
            self._wait_ready(host)

    def _wait_ready(self, h: Host) -> None:
        p = self.procs[h.name]
        out = p.stdout
        if out is None:
            raise AgentStartError("agent stdout not captured")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([out], [], [], 0.1)
            if ready:
                line = out.readline()
                if b"ready" in line:
                    return
                if not line:
                    break
        p.kill()
        p.wait()
        tail = self.log_path(h).read_text(errors="replace")[-2000:]
        raise AgentStartError(f"agent {h.name} did not start:\n{tail}")

    def kill(self, h: Host, sig: int = signal.SIGKILL) -> None:
        """Stop one agent abruptly (crash tests); its pinned flows stay in place."""
        p = self.procs.pop(h.name)
        p.send_signal(sig)
        p.wait(STOP_TIMEOUT_S)
        if p.stdout:
            p.stdout.close()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in list(self.procs.items()):
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
            del self.procs[name]
        for h in self.hosts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path(h))

    def __enter__(self) -> LabAgents:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
