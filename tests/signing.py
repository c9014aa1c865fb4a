"""Signing keys made on the spot (ssh-keygen, gpg) and the git options that sign with them."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SigningKey:
    """A key that signs commits: ``git_config`` goes before the git subcommand,
    ``env`` into its environment; ``public`` is what a GitSource lists."""

    provider: str  # "ssh" or "openpgp"
    public: str
    git_config: tuple[str, ...]
    env: dict[str, str]

    def git_args(self) -> list[str]:
        return [*self.git_config, "-c", "commit.gpgSign=true"]


def ssh_key(directory: Path, name: str = "signer") -> SigningKey:
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test",
                    "-f", str(private)], check=True, capture_output=True)
    return SigningKey("ssh", (directory / f"{name}.pub").read_text(),
                      ("-c", "gpg.format=ssh", "-c", f"user.signingkey={private}"), {})


def openpgp_key(directory: Path, name: str = "signer") -> SigningKey:
    """A passphrase-less ed25519 key in a gpg home of its own (stop it with ``stop_gpg``)."""
    home = directory / f"gnupg-{name}"
    home.mkdir(parents=True, mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    uid = f"{name} <{name}@test>"
    subprocess.run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", uid,
                    "ed25519", "sign", "never"], env=env, check=True, capture_output=True)
    public = subprocess.run(["gpg", "--armor", "--export", f"{name}@test"], env=env, check=True,
                            capture_output=True, text=True).stdout
    listing = subprocess.run(["gpg", "--with-colons", "--list-keys", f"{name}@test"], env=env,
                             check=True, capture_output=True, text=True).stdout
    fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
    return SigningKey("openpgp", public, ("-c", "gpg.format=openpgp", "-c", f"user.signingkey={fpr}"),
                      {"GNUPGHOME": str(home)})


def stop_gpg(key: SigningKey) -> None:
    home = key.env.get("GNUPGHOME")
    if home and shutil.which("gpgconf"):
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False,
                       capture_output=True)
