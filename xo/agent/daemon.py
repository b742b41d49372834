"""The agent daemon: one per host. Wires datapath, gRPC server, local app API and health.

Start-up order matters for a restart: attach the datapath first (reusing pinned maps, so
offloaded flows keep flowing while we were away), reconcile the owner's flows from them, and
only then accept RPCs and apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpc.aio

from xo.agent import rpc
from xo.agent.config import AgentConfig
from xo.agent.context import Context, NoRuleQueue, NoTls, RuleQueue, open_timings
from xo.agent.framing import Frame
from xo.agent.hwqueue import HwRules
from xo.agent.local import AppConn, LocalServer
from xo.agent.ops import CountingService, Ops
from xo.agent.owner import Owner
from xo.agent.status import Sources
from xo.agent.target import Target
from xo.datapath import Datapath
from xo.tls.hooks import KernelTls
from xo.v1 import local_pb2, offload_pb2_grpc

log = logging.getLogger("xo.agent")
SHUTDOWN_GRACE_S = 0.5


class Agent:
    def __init__(self, cfg: AgentConfig, dp: Datapath, timings: Path | None = None) -> None:
        self.cfg = cfg
        self.dp = dp
        self._timings_path = timings
        self.ctx: Context | None = None
        self.owner: Owner | None = None
        self.target: Target | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ops = Ops()  # metrics, `xo status`

    async def start(self) -> None:
        cfg = self.cfg
        dp = self.dp
        local = LocalServer(cfg.local, self._on_frame)
        # KernelTls logs once why TLS flows stay local where the kernel has no kTLS.
        tls = KernelTls()
        self.ctx = ctx = Context(cfg, dp, local, rpc.Channels(cfg),
                                 rules=self._rules(), tls=tls if tls.supported else NoTls(),
                                 timings=open_timings(self._timings_path),
                                 observer=self.ops.record)
        self.owner, self.target = Owner(ctx), Target(ctx)
        self.owner.reconcile()
        self.target.reconcile()
        server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
        offload_pb2_grpc.add_OffloadServicer_to_server(
            CountingService(self.ops, ctx, self.owner, self.target), server)
        server.add_secure_port(cfg.listen, rpc.server_credentials(cfg.tls))
        await server.start()
        self._server = server
        await self.ops.start(Sources(ctx, self.owner, self.target, self.ops.ages,
                                     dp.reattached), cfg.metrics)
        local.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.owner.health()), loop.create_task(self.target.sweep())]
        log.info("agent %s: gRPC on %s, apps on %s, datapath on %s%s", cfg.name, cfg.listen,
                 cfg.local.path, cfg.interface, " (reattached)" if dp.reattached else "")

    def _rules(self) -> RuleQueue:
        if not self.cfg.hw_rules:
            return NoRuleQueue()
        return HwRules(self.dp, self.cfg.hw_policy())

    async def _on_frame(self, conn: AppConn, frame: Frame) -> None:
        ctx, owner, target = self.ctx, self.owner, self.target
        if ctx is None or owner is None or target is None:
            return  # not started yet: the frame (and its fd) is closed by the caller
        body = frame.msg.WhichOneof("body")
        if body == "status":  # operators (`xo status`) need no Hello
            await conn.send(local_pb2.LocalMessage(status_reply=await self.ops.status()))
        elif body == "hello":
            conn.app, conn.accepts = frame.msg.hello.app, frame.msg.hello.accept_connections
            ok = bool(conn.app)
            await conn.send(local_pb2.LocalMessage(hello_reply=local_pb2.HelloReply(
                ok=ok, detail="" if ok else "an app needs a name", agent=self.cfg.name,
                ktls=ctx.tls.supported)))
        elif not conn.app:
            log.warning("app connection sent %s before Hello: ignored", body)
        elif body == "offload":
            res = await owner.offload(conn, frame.msg.offload, frame.take_fd())
            self.ops.metrics.offload(res)
            await conn.send(local_pb2.LocalMessage(offload_result=res))
        elif body == "give_back":
            gb = await target.give_back(conn, frame.msg.give_back, frame.take_fd())
            self.ops.metrics.give_back(gb)
            await conn.send(local_pb2.LocalMessage(give_back_result=gb))
        else:
            log.warning("app %r sent unexpected %s: ignored", conn.app, body)

    async def stop(self) -> None:
        """Stop serving; the datapath (owned by the caller) keeps its pinned flows."""
        await self.ops.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.stop(SHUTDOWN_GRACE_S)
        if self.ctx is None:
            return
        if self.target is not None:
            self.target.close_all()
        if isinstance(self.ctx.rules, HwRules):
            await asyncio.get_running_loop().run_in_executor(None, self.ctx.rules.close)
        await self.ctx.local.close()
        await self.ctx.channels.close()
        if self.ctx.timings is not None:
            self.ctx.timings.close()


async def serve(cfg: AgentConfig, dp: Datapath, timings: Path | None = None) -> None:
    """Run an agent until SIGTERM/SIGINT. The datapath is attached (and detached) outside the
    event loop: pyroute2's synchronous API runs an event loop of its own."""
    agent = Agent(cfg, dp, timings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    print(f"xo agent {cfg.name}: ready", flush=True)
    try:
        await stop.wait()
    finally:
        await agent.stop()
