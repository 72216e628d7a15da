"""Share: a host folder exported to the guest, validated and kept in the folder format."""

from __future__ import annotations

from pathlib import Path

import pytest

import virtkit
from virtkit.model import Share


class TestShare:
    """Fields are checked by name; tags are unique per machine; save/load round-trips."""

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"host_path": "/srv", "tag": "has space"}, "tag"),
            ({"host_path": "/srv", "tag": "x" * 32}, "tag"),
            ({"host_path": "/srv", "tag": "ok", "read_only": "yes"}, "read_only"),
            ({"host_path": "/srv", "tag": "ok", "security_model": "open"}, "security_model"),
            ({"host_path": 3, "tag": "ok"}, "host_path"),
        ],
    )
    def test_bad_fields(self, kwargs: dict[str, object], field: str) -> None:
        """Each bad value is a ConfigError naming its field."""
        with pytest.raises(virtkit.ConfigError, match=f"'{field}'"):
            Share(**kwargs)  # type: ignore[arg-type]

    def test_duplicate_tags(self) -> None:
        """Two shares with one tag are refused, naming the second."""
        with pytest.raises(virtkit.ConfigError, match=r"shares\[1\]\.tag"):
            virtkit.Machine(name="m", shares=[Share("/a", "t"), Share("/b", "t")])

    def test_round_trip(self, tmp_path: Path) -> None:
        """Shares and the agent switch survive save/load."""
        machine = virtkit.Machine(
            name="m", agent=True, shares=[Share("data", "d", read_only=False), Share("/srv", "s")]
        )
        virtkit.save(machine, tmp_path / "m")
        assert virtkit.load(tmp_path / "m") == machine
        assert "[[shares]]" in (tmp_path / "m" / "machine.toml").read_text()
