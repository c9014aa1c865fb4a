"""The one error type of the image subsystem, shared by the cache, the sources and the overlays."""

from __future__ import annotations

from typing import Literal

Reason = Literal["ChecksumMismatch", "Unreachable", "NotFound", "PathRefused", "NixError", "Invalid",
                 "LocalIO"]


class ImageError(Exception):
    """An image could not be made available; ``reason`` is meant for a VM condition's reason.

    ``transient`` says whether retrying the same source may help (network errors, 5xx, a full disk) or
    not (a checksum mismatch, a 404, a refused path): the cache retries only transient failures.
    """

    def __init__(self, reason: Reason, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message
        self.transient = transient

    def __repr__(self) -> str:
        return f"ImageError({self.reason!r}, {self.message!r}, transient={self.transient})"
