"""An S3 deployment in an xo.lab: storage nodes on the backends, the gateway on frontend 0.

Each server runs as its own `xo s3-node` / `xo s3-gateway` process inside its host's network
namespace, from a generated TOML file, so tests and benchmarks exercise exactly what an
operator runs. Used by tests/net/test_s3_lab.py and `xo s3-bench`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from xo.lab import Host, Lab
from xo.pki import DevCA

GATEWAY_PORT = 9000
NODE_PORT = 9100
# Generous: on a loaded 2-core machine a Python server can take many seconds to start.
READY_TIMEOUT = 60.0
POLL_SECONDS = 0.05
STOP_TIMEOUT = 5.0
ACCESS_KEY, SECRET_KEY = "XOLABKEY", "xo-lab-secret"


class DeploymentError(RuntimeError):
    """A server of the deployment did not start (its log is in the message)."""


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class S3Deployment:
    """Gateway on lab.frontends[0] (VIP:9000), one storage node per backend.

    With `tls` the gateway serves HTTPS with a certificate for the VIP from a fresh dev CA
    (`ca_path`: what clients verify against, e.g. boto3 verify= or aws --ca-bundle).
    """

    def __init__(self, lab: Lab, workdir: Path, offload: bool = False,
                 threshold: int = 1024 * 1024, replicas: int = 2,
                 agent_sockets: dict[str, str] | None = None, verbose: bool = False,
                 tls: bool = False, agent_timeout: float = 5.0,
                 return_timeout: float = 30.0) -> None:
        self.lab = lab
        self.tls = tls
        self.agent_timeout = agent_timeout  # the VM tier (TCG) needs more than a host
        self.return_timeout = return_timeout
        self.workdir = workdir
        self.config_path = workdir / "s3.toml"
        self.offload = offload
        self.threshold = threshold
        self.replicas = replicas
        self.agent_sockets = agent_sockets or {}
        self.verbose = verbose
        self._procs: dict[str, subprocess.Popen[Any]] = {}
        self._logs: dict[str, IO[bytes]] = {}

    @property
    def gateway_host(self) -> Host:
        return self.lab.frontends[0]

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.lab.vip4}:{GATEWAY_PORT}"

    @property
    def ca_path(self) -> Path:
        return self.workdir / "pki" / "ca.pem"

    def log(self, name: str) -> str:
        """The output so far of server `name` ("gateway", "n0", ...)."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def write_config(self) -> None:
        lines = [
            "[gateway]",
            f'listen = "0.0.0.0:{GATEWAY_PORT}"',
            f"replicas = {self.replicas}",
            f"write_quorum = {self.replicas}",
            "connect_timeout = 1.0",
            "io_timeout = 10.0",
            f"keys = {{ {ACCESS_KEY} = {_toml_str(SECRET_KEY)} }}",
            "",
            "[offload]",
            f"enabled = {'true' if self.offload else 'false'}",
            f"threshold = {self.threshold}",
            f"agent_socket = {_toml_str(self.agent_sockets.get(self.gateway_host.name, ''))}",
            f"agent_timeout = {self.agent_timeout}",
            f"return_timeout = {self.return_timeout}",
        ]
        if self.tls:
            files = DevCA("xo-s3-lab-ca").write(self.workdir / "pki", str(self.lab.vip4))
            lines += ["", "[tls]", f"cert = {_toml_str(str(files.cert))}",
                      f"key = {_toml_str(str(files.key))}"]
        for i, b in enumerate(self.lab.backends):
            lines += [
                "",
                "[[nodes]]",
                f'name = "n{i}"',
                f'address = "{b.ip4}:{NODE_PORT}"',
                f"data_dir = {_toml_str(str(self.workdir / f'data-n{i}'))}",
                f'target = "{b.name}"',
                f"agent_socket = {_toml_str(self.agent_sockets.get(b.name, ''))}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _start(self, name: str, host: Host, argv: list[str], port: int) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in _stop
        self._logs[name] = log
        cmd = [sys.executable, "-m", "xo.cli", *argv, "-c", str(self.config_path)]
        if self.verbose:
            cmd.append("-v")
        self._procs[name] = host.popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._procs[name].poll() is not None:
                break
            try:
                with host.enter():
                    socket.create_connection((str(host.ip4), port), timeout=1).close()
                return
            except OSError:
                time.sleep(POLL_SECONDS)
        text = self.log(name)[-2000:]
        self._stop(name)
        raise DeploymentError(f"{name} did not start on {host.name}:{port}:\n{text}")

    def start_gateway(self, name: str = "gateway", port: int = GATEWAY_PORT,
                      offload: bool = True) -> str:
        """Start a gateway process on f0 (another port for a second one); its URL."""
        argv = ["s3-gateway", "--listen", f"0.0.0.0:{port}"]
        if not offload:
            argv.append("--no-offload")
        self._start(name, self.gateway_host, argv, port)
        return f"{self.scheme}://{self.lab.vip4}:{port}"

    def stop_gateway(self, name: str = "gateway") -> None:
        """Stop a gateway process (SIGTERM: it prints its counters to its log on the way)."""
        self._stop(name)

    def start_node(self, i: int) -> None:
        self._start(f"n{i}", self.lab.backends[i], ["s3-node", "--name", f"n{i}"], NODE_PORT)

    def stop_node(self, i: int) -> None:
        self._stop(f"n{i}")

    def start(self) -> S3Deployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        try:
            for i in range(len(self.lab.backends)):
                self.start_node(i)
            self.start_gateway(offload=self.offload)
        except BaseException:
            self.close()
            raise
        return self

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()

    def close(self) -> None:
        for name in list(self._procs):
            self._stop(name)

    def __enter__(self) -> S3Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
