"""Commit signature verification (``spec.verify``): git's own ``verify-commit`` machinery.

The trusted keys are the only trust root: SSH keys go into a temporary allowed-signers file
(``gpg.format=ssh``, ``gpg.ssh.allowedSignersFile``), OpenPGP keys into a temporary gpg home
with ``trust-model always``. git runs hermetically (no system or global config), so nothing
on the host can widen the set of accepted signers. Key material is never logged: messages
name keys by fingerprint and by where they were configured.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hyperfleet.reconcilers.models.gitsource import SSH_KEY_TYPES, VerifyProvider, key_problem

from .types import GitOpsError

log = logging.getLogger("hyperfleet.gitops.verify")

_SIGNATURE_HEADERS = ("gpgsig ", "gpgsig-sha256 ")


def signature_kind(raw_commit: str) -> str | None:
    """"ssh", "openpgp", "x509" or None: which kind of signature a raw commit object carries."""
    header = raw_commit.split("\n\n", 1)[0]
    for line in header.splitlines():
        if line.startswith(_SIGNATURE_HEADERS):
            armor = line.split(" ", 1)[1]
            if "SSH SIGNATURE" in armor:
                return "ssh"
            if "PGP SIGNATURE" in armor:
                return "openpgp"
            return "x509"
    return None


@dataclass(frozen=True)
class PublicKey:
    """One entry of trusted keys; ``origin`` names where it was configured (for messages)."""

    origin: str
    data: str


class VerificationError(GitOpsError):
    """The commit is not acceptable (``reason``: UnsignedCommit, InvalidSignature,
    UntrustedKey) or the configured keys are unusable (InvalidPublicKey)."""

    def __init__(self, reason: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class Verified:
    commit: str
    fingerprint: str  # of the key that made the signature
    signer: str  # the identity gpg reports, or "" for SSH


def keys_digest(provider: VerifyProvider, keys: Sequence[PublicKey]) -> str:
    """Identifies a key set (for caching a verdict) without keeping the keys themselves."""
    h = hashlib.sha256(provider.value.encode())
    for k in keys:
        h.update(b"\0" + k.data.encode())
    return h.hexdigest()


def check_keys(provider: VerifyProvider, keys: Sequence[PublicKey]) -> None:
    """The cheap shape checks of the model, applied to keys from a Secret too."""
    if not keys:
        raise VerificationError("InvalidPublicKey", "spec.verify lists no public keys (publicKeys is "
                                "empty and the Secret holds none): add the signers' public keys")
    for k in keys:
        problem = key_problem(k.data, provider)
        if problem:
            raise VerificationError("InvalidPublicKey", f"{k.origin} {problem}")


class Verifier:
    """Runs ``git log --format=%G?...`` on a commit of a (bare) repository against a key set.

    ``timeout`` bounds each subprocess; a missing tool (gpg or ssh-keygen) is reported as
    such, not as an untrusted commit."""

    def __init__(self, git_binary: str = "git", timeout: float = 30.0) -> None:
        self.git_binary = git_binary
        self.timeout = timeout

    def verify(self, git_dir: Path, commit: str, provider: VerifyProvider,
               keys: Sequence[PublicKey], where: str) -> Verified:
        """Accept ``commit`` or raise VerificationError; ``where`` names the key settings in
        messages (e.g. "spec.verify.publicKeys")."""
        check_keys(provider, keys)
        tool = "ssh-keygen" if provider == VerifyProvider.SSH else "gpg"
        if shutil.which(tool) is None:
            raise VerificationError("VerificationUnavailable", f"{tool} is not installed where the "
                                    f"GitSource reconciler runs, so {provider.value} signatures "
                                    "cannot be checked: install it (make system-deps)", transient=True)
        short = commit[:12]
        with tempfile.TemporaryDirectory(prefix="hf-verify-") as tmp:
            home = Path(tmp)
            os.chmod(home, 0o700)
            # Keys first: a key that cannot be used is the thing to fix, whatever the commit.
            with (self._ssh(home, keys) if provider == VerifyProvider.SSH
                  else self._gpg(home, keys)) as (config, env):
                kind = signature_kind(self._git(git_dir, ["cat-file", "commit", commit], env))
                if kind is None:
                    raise VerificationError("UnsignedCommit", f"commit {short} is not signed: sign "
                                            f"it (git commit -S) with a key listed in {where}")
                if kind != provider.value:
                    raise VerificationError(
                        "UntrustedKey", f"commit {short} carries an {kind} signature but "
                        f"spec.verify.provider is {provider.value}: sign it with a key listed in "
                        f"{where}, or change the provider and keys")
                out = self._git(git_dir, [*config, "log", "-1", "--no-show-signature",
                                          "--format=%G?%x00%GF%x00%GK%x00%GS", commit, "--"], env)
        status, fpr, key_id, signer = ([*out.rstrip("\n").split("\x00"), "", "", "", ""])[:4]
        fingerprint = fpr or key_id
        # SSH: "U" is a good signature by a key missing from the allowed signers: refused.
        # OpenPGP: every imported key is trusted (trust-model always), so "U" cannot mean that.
        accepted = {"G"} if provider == VerifyProvider.SSH else {"G", "U"}
        if status in accepted and fingerprint:
            return Verified(commit, fingerprint, signer)
        if status in ("U", "E"):
            what = "SSH" if provider == VerifyProvider.SSH else "OpenPGP"
            raise VerificationError("UntrustedKey", f"commit {short} is signed by {what} key "
                                    f"{fingerprint or '?'}, which is not in {where}: add that public "
                                    "key there if you trust it")
        if status in ("X", "Y", "R"):
            why = {"X": "the signature has expired", "Y": "the signing key has expired",
                   "R": "the signing key was revoked"}[status]
            raise VerificationError("InvalidSignature", f"commit {short}: {why} (key "
                                    f"{fingerprint or '?'}); sign it again with a valid key in {where}")
        raise VerificationError("InvalidSignature", f"commit {short} has a signature that does not "
                                f"verify (key {fingerprint or '?'}): the commit was altered after "
                                "signing, or the signature is corrupt; sign it again with a key in "
                                f"{where}")

    def _git(self, git_dir: Path, args: list[str], env: dict[str, str]) -> str:
        try:
            r = subprocess.run([self.git_binary, "--git-dir", str(git_dir), *args], env=env,
                               capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise VerificationError("VerificationFailed", f"checking the signature took longer than "
                                    f"{self.timeout:.0f}s", transient=True) from None
        if r.returncode != 0:
            raise VerificationError("VerificationFailed", "git could not read the commit's "
                                    f"signature: {r.stderr.strip()[-300:]}", transient=True)
        return r.stdout

    def _base_env(self, home: Path) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C"}

    @contextmanager
    def _ssh(self, home: Path, keys: Sequence[PublicKey]) -> Iterator[tuple[list[str], dict[str, str]]]:
        lines = []
        for k in keys:
            for line in k.data.splitlines():
                fields = line.split()
                if len(fields) >= 2 and fields[0] in SSH_KEY_TYPES:
                    self._check_ssh_key(home, k.origin, f"{fields[0]} {fields[1]}")
                    # Any identity: the key, not the e-mail a committer claims, is what counts.
                    lines.append(f'* namespaces="git" {fields[0]} {fields[1]}')
        allowed = home / "allowed_signers"
        allowed.write_text("\n".join(lines) + "\n")
        yield (["-c", "gpg.format=ssh", "-c", f"gpg.ssh.allowedSignersFile={allowed}",
                "-c", "gpg.ssh.program=ssh-keygen"], self._base_env(home))

    def _check_ssh_key(self, home: Path, origin: str, key: str) -> None:
        probe = home / "probe.pub"
        probe.write_text(key + "\n")
        r = subprocess.run(["ssh-keygen", "-l", "-f", str(probe)], capture_output=True, text=True,
                           timeout=self.timeout, check=False)
        probe.unlink()
        if r.returncode != 0:
            raise VerificationError("InvalidPublicKey", f"{origin} holds a key ssh-keygen cannot read "
                                    "(truncated or corrupt): copy the whole line of the .pub file")

    @contextmanager
    def _gpg(self, home: Path, keys: Sequence[PublicKey]) -> Iterator[tuple[list[str], dict[str, str]]]:
        gnupg = home / "gnupg"
        gnupg.mkdir(mode=0o700)
        (gnupg / "gpg.conf").write_text("trust-model always\nno-autostart\n")
        env = {**self._base_env(home), "GNUPGHOME": str(gnupg)}
        try:
            for k in keys:
                r = subprocess.run(["gpg", "--batch", "--no-tty", "--no-autostart", "--status-fd", "1",
                                    "--import-options", "import-minimal", "--import"],
                                   input=k.data, env=env, capture_output=True, text=True,
                                   timeout=self.timeout, check=False)
                if "IMPORT_OK" not in r.stdout:
                    raise VerificationError("InvalidPublicKey", f"{k.origin} holds no OpenPGP public "
                                            "key gpg can import (truncated or corrupt): export it "
                                            "again with gpg --armor --export <id>")
            yield (["-c", "gpg.format=openpgp", "-c", "gpg.program=gpg"], env)
        finally:
            # A gpg that started an agent anyway must not outlive the temporary home.
            if shutil.which("gpgconf"):
                subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "all"], env=env,
                               capture_output=True, timeout=self.timeout, check=False)


__all__ = ["PublicKey", "VerificationError", "Verified", "Verifier", "check_keys", "keys_digest"]
