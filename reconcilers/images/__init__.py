"""VM images on a node: where they come from, the content-addressed cache, per-VM overlays, path rules."""

from .cache import CachedImage, ImageCache, Pull
from .errors import ImageError
from .overlay import create_overlay, image_format, image_info, overlay_backing, remove_disks
from .paths import DEFAULT_ROOTS, FORBIDDEN, PathRefused, confine
from .source import ImageSource, redact_url

__all__ = [
    "DEFAULT_ROOTS",
    "FORBIDDEN",
    "CachedImage",
    "ImageCache",
    "ImageError",
    "ImageSource",
    "PathRefused",
    "Pull",
    "confine",
    "create_overlay",
    "image_format",
    "image_info",
    "overlay_backing",
    "redact_url",
    "remove_disks",
]
