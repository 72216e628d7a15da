"""Size parsing for image options (the shared implementation lives in ``virtkit.units``)."""

from virtkit.units import format_size, parse_size

__all__ = ["format_size", "parse_size"]
