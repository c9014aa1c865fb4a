"""GitSource: a Git repository (and a path in it) whose manifests are the fleet's desired state."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from enum import StrEnum
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from .common import CamelModel, Condition, KubeObject

#: Go-style durations as Flux users write them: "30s", "1m", "1h30m", "500ms".
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SHA_PATTERN = r"^([0-9a-f]{40}|[0-9a-f]{64})$"
_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._~-]+@)?[A-Za-z0-9.-]+:(?!//)[^\s]+$")


def parse_duration(value: str) -> float:
    """Seconds in a Go-style duration; the CRD pattern already rejected anything else."""
    value = value.strip()
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"invalid duration {value!r}: write it like 30s, 1m or 1h30m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))


class GitRef(CamelModel):
    """Which revision to follow; at most one of branch, tag, commit (none: the remote's HEAD)."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.branch) ? 1 : 0) + (has(self.tag) ? 1 : 0) "
                    "+ (has(self.commit) ? 1 : 0) <= 1",
                    "message": "set at most one of ref.branch, ref.tag, ref.commit",
                }
            ]
        }
    }

    branch: str | None = Field(default=None, min_length=1, description="Follow this branch's tip")
    tag: str | None = Field(default=None, min_length=1, description="Follow this tag")
    commit: str | None = Field(
        default=None, pattern=SHA_PATTERN, description="Pin this full commit SHA (40 hex digits)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> GitRef:
        if sum(x is not None for x in (self.branch, self.tag, self.commit)) > 1:
            raise ValueError("set at most one of ref.branch, ref.tag, ref.commit")
        return self

    def describe(self) -> str:
        if self.branch:
            return f"branch {self.branch}"
        if self.tag:
            return f"tag {self.tag}"
        if self.commit:
            return f"commit {self.commit[:12]}"
        return "the remote's default branch (HEAD)"

    def short(self) -> str:
        return self.branch or self.tag or (self.commit or "")[:12] or "HEAD"


class SecretRef(CamelModel):
    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="Secret in the GitSource's namespace: `token` (+ optional `username`) for "
        "HTTPS, or `identity` (SSH private key) + `known_hosts` for SSH",
    )


class KeysSecretRef(CamelModel):
    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="Secret in the GitSource's namespace; every data value holds trusted public "
        "keys (any key names)",
    )


class Renderer(StrEnum):
    AUTO = "Auto"
    YAML = "Yaml"
    NIX = "Nix"


class VerifyMode(StrEnum):
    HEAD = "HEAD"


class VerifyProvider(StrEnum):
    OPENPGP = "openpgp"
    SSH = "ssh"


#: Public key algorithms ``ssh-keygen -Y verify`` accepts for git commit signatures.
SSH_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
PGP_PUBLIC_BLOCK = "-----BEGIN PGP PUBLIC KEY BLOCK-----"


def key_problem(text: str, provider: VerifyProvider) -> str | None:
    """What is wrong with one entry of public keys for ``provider``, or None. Cheap checks
    only (``verify`` runs the real tools); the answer never quotes the key material."""
    if "PRIVATE KEY" in text:
        return "holds a PRIVATE key: remove it at once and give only the public key (.pub / --export)"
    if provider == VerifyProvider.OPENPGP:
        if PGP_PUBLIC_BLOCK in text:
            return None
        if text.lstrip().split(" ", 1)[0] in SSH_KEY_TYPES:
            return "is an SSH key but spec.verify.provider is openpgp: set provider: ssh"
        return (f"is not an ASCII-armored OpenPGP public key: export it with "
                f"`gpg --armor --export <id>` (it starts with {PGP_PUBLIC_BLOCK})")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        return "is empty: give one SSH public key per line, as in a .pub file"
    if PGP_PUBLIC_BLOCK in text:
        return "is an OpenPGP key but spec.verify.provider is ssh: set provider: openpgp"
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) < 2 or fields[0] not in SSH_KEY_TYPES:
            return (f"line {n} is not an SSH public key: write it as in a .pub file "
                    "(ssh-ed25519 AAAA... comment)")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            return f"line {n}: the key data is not valid base64; copy the whole .pub line"
        if blob[4:4 + len(fields[0])] != fields[0].encode():
            return f"line {n}: the key data does not match its type {fields[0]}; copy the whole .pub line"
        if fields[0] == "ssh-ed25519" and len(blob) != 51:  # type and a 32-byte point, each sized
            return f"line {n}: the ed25519 key is truncated; copy the whole .pub line"
    return None


class VerifySpec(CamelModel):
    """Refuse commits not signed by a trusted key (Flux's GitRepository ``spec.verify``)."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.publicKeys) && size(self.publicKeys) > 0) || has(self.secretRef)",
                    "message": "spec.verify needs the trusted keys: set publicKeys or secretRef",
                }
            ]
        }
    }

    mode: VerifyMode = Field(
        default=VerifyMode.HEAD, description="HEAD: the commit to apply must carry a valid signature"
    )
    provider: VerifyProvider = Field(
        default=VerifyProvider.OPENPGP,
        description="openpgp: gpg signatures, keys ASCII-armored; ssh: signatures made with "
        "gpg.format=ssh, keys as in a .pub file (one per line)",
    )
    public_keys: list[str] = Field(
        default_factory=list,
        description="Trusted public keys, inline (an entry may hold several: SSH keys one per "
        "line, OpenPGP keys as armored blocks)",
    )
    secret_ref: KeysSecretRef | None = Field(
        default=None,
        description="Secret whose every data value holds trusted public keys (as in "
        "publicKeys); both may be set",
    )

    @model_validator(mode="after")
    def _keys(self) -> VerifySpec:
        if not self.public_keys and self.secret_ref is None:
            raise ValueError("spec.verify needs the trusted keys: set publicKeys or secretRef")
        for i, text in enumerate(self.public_keys):
            problem = key_problem(text, self.provider)
            if problem:
                raise ValueError(f"spec.verify.publicKeys[{i}] {problem}")
        return self


class HealthCheckSpec(CamelModel):
    enabled: bool = Field(
        default=True,
        description="Gate Ready on the health of the VirtualMachines this GitSource applied",
    )
    timeout: str = Field(
        default="5m",
        pattern=DURATION_PATTERN,
        description="How long applied VirtualMachines may take to become healthy (counted from "
        "the apply that changed them) before Ready turns False with HealthCheckFailed",
    )

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout)


class GitSourceSpec(CamelModel):
    url: str = Field(
        min_length=1,
        description="Repository URL: https://, http://, ssh://, git@host:path, file:// or a "
        "local path to a (bare) repository",
    )
    ref: GitRef | None = Field(default=None, description="Revision to follow (default: HEAD)")
    path: str = Field(
        default=".", description="Directory inside the repository holding the manifests"
    )
    interval: str = Field(
        default="1m",
        pattern=DURATION_PATTERN,
        description="How often to fetch and re-apply (drift correction), e.g. 30s, 5m",
    )
    timeout: str = Field(
        default="60s", pattern=DURATION_PATTERN, description="Limit for one git fetch / nix eval"
    )
    secret_ref: SecretRef | None = Field(default=None, description="Credentials for the remote")
    suspend: bool = Field(default=False, description="Stop fetching, applying and pruning")
    prune: bool = Field(default=True, description="Delete objects that were removed from Git")
    target_namespace: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="Put every namespaced object here (overrides metadata.namespace)",
    )
    max_deletion_ratio: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of the applied objects one commit may delete; a commit deleting more "
        "is held until annotated hyperfleet.dev/confirm-deletion=<commit sha>",
    )
    renderer: Renderer = Field(
        default=Renderer.AUTO,
        description="Auto: Nix when path holds flake.nix, else YAML; Yaml; Nix "
        "(nix eval --json <path>#hyperfleet)",
    )
    verify: VerifySpec | None = Field(
        default=None,
        description="Apply only commits signed by one of these keys (unset: no signature check)",
    )
    health_check: HealthCheckSpec = Field(
        default_factory=HealthCheckSpec,
        description="Ready follows the health of the applied VirtualMachines (on by default)",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if v.startswith("/") or _SCP_LIKE.match(v):
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http", "ssh", "git", "file"):
            raise ValueError(
                f"url {v!r}: use https://, http://, ssh://, git@host:path, file:// or an "
                "absolute path"
            )
        if parts.password:
            raise ValueError(
                "url must not contain a password or token: put it in a Secret (key `token`) "
                "and name it in spec.secretRef"
            )
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        clean = v.strip().strip("/") or "."
        parts = [p for p in clean.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ValueError(f"path {v!r} must stay inside the repository: remove '..'")
        return "/".join(parts) or "."

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval)

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout)


class InventoryEntry(CamelModel):
    """One object this GitSource applied; only these are ever pruned."""

    api_version: str
    kind: str
    namespace: str | None = None
    name: str


class HeldDeletion(CamelModel):
    """A commit whose deletions were not carried out, waiting for confirmation."""

    commit: str
    count: int
    total: int
    objects: list[str] = Field(default_factory=list, description="The first objects it would delete")


class GitSourceStatus(CamelModel):
    model_config = CamelModel.model_config | {"extra": "allow"}

    observed_generation: int | None = None
    last_fetched_commit: str | None = None
    last_applied_commit: str | None = None
    last_attempted_commit: str | None = None
    last_handled_reconcile_at: str | None = Field(
        default=None, description="Value of the hyperfleet.dev/reconcile-now annotation handled last"
    )
    conditions: list[Condition] = Field(default_factory=list)
    inventory: list[InventoryEntry] = Field(default_factory=list)
    last_error: str | None = None
    held_deletion: HeldDeletion | None = None
    last_changed_at: datetime | None = Field(
        default=None,
        description="When the last apply created or updated objects; spec.healthCheck.timeout "
        "counts from here",
    )


class GitSource(KubeObject):
    api_version: Literal["hyperfleet.dev/v1alpha1"] = "hyperfleet.dev/v1alpha1"
    kind: Literal["GitSource"] = "GitSource"
    spec: GitSourceSpec
    status: GitSourceStatus = Field(default_factory=GitSourceStatus)
