"""Where a VM's base image comes from: a pure value the driver builds from ``spec.image``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from .errors import ImageError

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
#: /nix/store/<32 chars of nix's base32>-<name>; nix's base32 alphabet omits e, o, u and t.
_STORE_PATH = re.compile(r"/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]*")


def redact_url(url: str) -> str:
    """The URL without userinfo and query, so messages and the index never carry credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


@dataclass(frozen=True)
class ImageSource:
    """One image source; ``key`` is the identity nodes report and the scheduler matches."""

    kind: Literal["path", "url", "nix"]
    location: str  # host path | http(s) URL | /nix/store/<hash>-<name>
    sha256: str | None = None  # required for url (64 hex), optional for path and nix
    nix_cache: str | None = None  # binary cache to `nix copy --from` (nix only)
    file: str | None = None  # nix only: the image's relative path inside the store path

    @property
    def key(self) -> str:
        """``sha256:<hex>`` when the content is declared, else where it comes from."""
        if self.sha256:
            return f"sha256:{self.sha256.lower()}"
        if self.kind == "nix":
            return f"nix:{self.location}" + (f"/{self.file}" if self.file else "")
        if self.kind == "url":
            return f"url:{redact_url(self.location)}"  # not pullable (sha256 is required) but printable
        return f"path:{self.location}"

    @property
    def display(self) -> str:
        """The source for messages and the index: URLs without credentials."""
        if self.kind == "url":
            return redact_url(self.location)
        if self.kind == "nix" and self.file:
            return f"{self.location}/{self.file}"
        return self.location

    def validate(self) -> None:
        """Raise ImageError("Invalid") when the description cannot be pulled as written."""

        def bad(msg: str) -> ImageError:
            return ImageError("Invalid", msg, transient=False)

        if self.sha256 is not None and not _HEX64.fullmatch(self.sha256):
            raise bad(f"spec.image.sha256 {self.sha256!r} is not 64 hex digits")
        if self.kind not in ("path", "url", "nix"):
            raise bad(f"unknown image source kind {self.kind!r}")
        if "\0" in self.location or not self.location:
            raise bad(f"spec.image.{self.kind} is empty or contains a NUL byte")
        if self.kind != "nix" and (self.nix_cache or self.file):
            raise bad("spec.image.nixCache and spec.image.file apply to nix images only")
        if self.kind == "url":
            parts = urlsplit(self.location)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise bad(f"spec.image.url {redact_url(self.location)!r} must be an http:// or https:// URL")
            if self.sha256 is None:
                raise bad(f"spec.image.sha256 is required for a URL image ({redact_url(self.location)}): "
                          "the download is verified against it")
        elif self.kind == "nix":
            if not _STORE_PATH.fullmatch(self.location):
                raise bad(f"spec.image.nix {self.location!r} is not a store path like "
                          "/nix/store/<32-character hash>-<name>")
            if self.file is not None:
                parts_ = self.file.split("/")
                if (not self.file or "\0" in self.file or os.path.isabs(self.file)
                        or any(p in ("", ".", "..") for p in parts_)):
                    raise bad(f"spec.image.file {self.file!r} must be a relative path inside the store path, "
                              "without '.' or '..'")
            if self.nix_cache is not None:
                scheme = urlsplit(self.nix_cache).scheme
                # Not ssh:// or s3://: those would use the node's own credentials on a spec's behalf.
                if scheme not in ("http", "https", "file") or "\0" in self.nix_cache:
                    raise bad(f"spec.image.nixCache {redact_url(self.nix_cache)!r} is not an http://, "
                              "https:// or file:// binary cache URL")
