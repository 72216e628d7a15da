"""Machine(agent=True) on a backend without an agent channel: warned about, refused when asked."""

from __future__ import annotations

import pytest

import virtkit


class TestNoAgentChannel:
    """The emulator has no virtio-serial port for a guest agent."""

    def test_warned_and_refused(self) -> None:
        """define() warns naming 'agent'; strict=True refuses; guest.agent is a ConfigError."""
        machine = virtkit.Machine(name="agentless", agent=True)
        with virtkit.connect("emulator") as hv:
            with pytest.warns(virtkit.CapabilityWarning, match="'agent'"):
                guest = hv.define(machine)
            with pytest.raises(virtkit.ConfigError, match="no guest agent channel"):
                guest.agent.ping()
            hv.undefine(guest)
            with pytest.raises(virtkit.ConfigError, match="agent"):
                hv.define(machine, strict=True)

    def test_agent_must_be_bool(self) -> None:
        """The model field takes True/False only."""
        with pytest.raises(virtkit.ConfigError, match="'agent'"):
            virtkit.Machine(name="x", agent="yes")  # type: ignore[arg-type]
