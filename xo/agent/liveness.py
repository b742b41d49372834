"""Is a peer's host still there, when its agent does not answer?

Why it matters: an owner that stops hearing from a target drops the target's redirects, and
any packet of those flows then meets no socket and draws an RST. That is right when the host
is gone (its connections died with it), wrong when only the agent is restarting (an upgrade,
a crash and respawn): the apps on that host still hold the sockets and keep serving. A TCP
connect to the agent's port tells the two apart: a refusal comes from a live kernel, silence
from a dead or unreachable host.
"""

from __future__ import annotations

import asyncio
import contextlib

from xo.flow import Endpoint

PROBE_TIMEOUT_S = 0.5


async def host_alive(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if the host of `address` (the agent's ADDR:PORT) answers TCP at all."""
    ep = Endpoint.parse(address)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(str(ep.ip), ep.port),
                                           timeout)
    except ConnectionRefusedError:
        return True  # a live kernel answered: only the agent is away
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
