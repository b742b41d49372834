"""Fixtures shared by the net tests that run real agents (the offload and ops modules)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from xo.agent.labkit import LabAgents
    from xo.lab import Lab

AGENT_BACKENDS = 2


@pytest.fixture(scope="module")
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Lab, LabAgents]]:
    """A lab (c0, f0, backends) with a running agent per host, shared by a module's tests.
    The module may set AGENT_BACKENDS (default 2) and define prepare_agents(agents), which
    changes the agents' configs or settings before they start."""
    from offload_kit import lab_with_agents  # BCC: imported only by the modules that use it

    backends = getattr(request.module, "AGENT_BACKENDS", AGENT_BACKENDS)
    prepare = getattr(request.module, "prepare_agents", None)
    with lab_with_agents(tmp_path_factory.mktemp("agents"), backends, prepare) as lab_agents:
        yield lab_agents
