"""virtkit: virtual machines, hypervisors and disk images as typed objects."""

from virtkit.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CorruptImageError,
    ImageError,
    ImageLockedError,
    ResourceError,
    StateError,
    TimeoutError,
    UnsupportedFeatureError,
    VirtkitError,
)

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "CorruptImageError",
    "ImageError",
    "ImageLockedError",
    "ResourceError",
    "StateError",
    "TimeoutError",
    "UnsupportedFeatureError",
    "VirtkitError",
]
