"""spec.verify: real signatures (ssh-keygen, gpg) on real commits, checked by git, and the
reconciler refusing what does not verify while keeping what it applied."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hyperfleet.reconcilers.gitops.verify import (
    PublicKey,
    VerificationError,
    Verifier,
    signature_kind,
)
from hyperfleet.reconcilers.models.gitsource import GitSourceSpec, VerifyProvider, key_problem
from tests.signing import SigningKey, openpgp_key, ssh_key, stop_gpg

from .test_gitops_fetch import GIT_ENV
from .test_gitops_reconcile import Env, vm


class Repo:
    """A bare remote and a clone whose commits are signed (or not) as each call says."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "remote.git"
        self.work = root / "work"
        root.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        self.git("init", "-q", "-b", "main", str(self.work), cwd=root)
        self.git("remote", "add", "origin", str(self.bare))

    def git(self, *args: str, cwd: Path | None = None, key: SigningKey | None = None) -> str:
        pre = key.git_args() if key else []
        env = {**os.environ, **GIT_ENV, "GIT_CONFIG_NOSYSTEM": "1", **(key.env if key else {})}
        r = subprocess.run(["git", *pre, *args], cwd=cwd or self.work, env=env, capture_output=True,
                           text=True, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def commit(self, files: dict[str, str], key: SigningKey | None, message: str = "c") -> str:
        for rel, text in files.items():
            p = self.work / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message, key=key)
        self.git("push", "-q", "--force", "origin", "HEAD:main")
        return self.git("rev-parse", "HEAD")

    def tamper(self) -> str:
        """Rewrite HEAD's message keeping its signature: a commit altered after signing."""
        raw = self.git("cat-file", "commit", "HEAD")
        forged = raw.replace("\n\nc", "\n\nc (altered)", 1) + "\n"
        r = subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--stdin"], cwd=self.work,
                           input=forged, capture_output=True, text=True, check=True)
        sha = r.stdout.strip()
        self.git("reset", "-q", "--hard", sha)
        self.git("push", "-q", "--force", "origin", "HEAD:main")
        return sha


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, SigningKey]]:
    d = tmp_path_factory.mktemp("keys")
    out = {"alice": ssh_key(d, "alice"), "mallory": ssh_key(d, "mallory"),
           "bob": openpgp_key(d, "bob"), "eve": openpgp_key(d, "eve")}
    yield out
    for k in out.values():
        stop_gpg(k)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo")


def check(repo: Repo, commit: str, provider: str, *public: str) -> str:
    keys = [PublicKey(f"spec.verify.publicKeys[{i}]", p) for i, p in enumerate(public)]
    try:
        v = Verifier().verify(repo.bare, commit, VerifyProvider(provider), keys, "spec.verify.publicKeys")
    except VerificationError as exc:
        return f"{exc.reason}: {exc.message}"
    return f"ok {v.fingerprint}"


def fingerprint(public: str) -> str:
    r = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=public, capture_output=True, text=True,
                       check=True)
    return r.stdout.split()[1]


def test_ssh_signatures(repo: Repo, keys: dict[str, SigningKey]) -> None:
    alice, mallory = keys["alice"], keys["mallory"]
    good = repo.commit({"a": "1"}, alice)
    assert check(repo, good, "ssh", alice.public) == f"ok {fingerprint(alice.public)}"
    # Several keys, one entry holding two lines: any listed key is trusted.
    assert check(repo, good, "ssh", mallory.public + alice.public).startswith("ok ")

    unsigned = repo.commit({"a": "2"}, None)
    out = check(repo, unsigned, "ssh", alice.public)
    assert out.startswith(f"UnsignedCommit: commit {unsigned[:12]} is not signed"), out
    assert "spec.verify.publicKeys" in out

    other = repo.commit({"a": "3"}, mallory)
    out = check(repo, other, "ssh", alice.public)
    assert out.startswith("UntrustedKey: ") and fingerprint(mallory.public) in out, out
    assert "not in spec.verify.publicKeys" in out and other[:12] in out

    repo.commit({"a": "4"}, alice)
    forged = repo.tamper()
    out = check(repo, forged, "ssh", alice.public)
    assert out.startswith("InvalidSignature: ") and "altered after signing" in out, out


def test_openpgp_signatures(repo: Repo, keys: dict[str, SigningKey]) -> None:
    bob, eve, alice = keys["bob"], keys["eve"], keys["alice"]
    good = repo.commit({"a": "1"}, bob)
    assert check(repo, good, "openpgp", bob.public).startswith("ok ")
    assert check(repo, good, "openpgp", eve.public + bob.public).startswith("ok ")
    out = check(repo, good, "openpgp", eve.public)
    assert out.startswith("UntrustedKey: ") and "OpenPGP key" in out, out
    # A signature of the other kind is refused, saying which provider would take it.
    out = check(repo, good, "ssh", alice.public)
    assert out.startswith("UntrustedKey: ") and "openpgp signature" in out and "provider is ssh" in out
    ssh_signed = repo.commit({"a": "2"}, alice)
    assert "ssh signature" in check(repo, ssh_signed, "openpgp", bob.public)
    repo.commit({"a": "3"}, bob)
    assert check(repo, repo.tamper(), "openpgp", bob.public).startswith("InvalidSignature: ")


def test_unusable_keys_are_named_never_quoted(repo: Repo, keys: dict[str, SigningKey],
                                              tmp_path: Path) -> None:
    good = repo.commit({"a": "1"}, keys["alice"])
    kind, b64 = keys["alice"].public.split()[:2]
    truncated = f"{kind} {b64[:-12]}"
    out = check(repo, good, "ssh", keys["alice"].public, truncated)
    assert out.startswith("InvalidPublicKey: spec.verify.publicKeys[1]"), out
    assert b64[:20] not in out
    private = (tmp_path / "k").as_posix()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", private], check=True)
    secret = Path(private).read_text()
    out = check(repo, good, "ssh", secret)
    assert out.startswith("InvalidPublicKey: ") and "PRIVATE key" in out and secret[40:80] not in out
    out = check(repo, good, "openpgp", keys["alice"].public)
    assert "is an SSH key but spec.verify.provider is openpgp: set provider: ssh" in out
    broken_pgp = keys["bob"].public[:60] + "\n" + keys["bob"].public[-40:]
    out = check(repo, good, "openpgp", broken_pgp)
    assert out.startswith("InvalidPublicKey: spec.verify.publicKeys[0] holds no OpenPGP public key")
    assert check(repo, good, "ssh").startswith("InvalidPublicKey: spec.verify lists no public keys")


def test_signature_kind() -> None:
    head = "tree t\nauthor a\ncommitter c\n"
    assert signature_kind(head + "\nmsg\n") is None
    assert signature_kind(head + "gpgsig -----BEGIN SSH SIGNATURE-----\n x\n\nmsg") == "ssh"
    assert signature_kind(head + "gpgsig -----BEGIN PGP SIGNATURE-----\n x\n\nmsg") == "openpgp"
    # Text in the message that looks like a header does not count.
    assert signature_kind(head + "\ngpgsig -----BEGIN SSH SIGNATURE-----\n") is None


def test_verify_spec_validation(keys: dict[str, SigningKey]) -> None:
    base: dict[str, Any] = {"url": "/r"}
    with pytest.raises(ValidationError, match="set publicKeys or secretRef"):
        GitSourceSpec.model_validate({**base, "verify": {"provider": "ssh"}})
    with pytest.raises(ValidationError, match="provider"):
        GitSourceSpec.model_validate({**base, "verify": {"provider": "x509", "publicKeys": ["k"]}})
    with pytest.raises(ValidationError, match=r"publicKeys\[0\] line 1 is not an SSH public key"):
        GitSourceSpec.model_validate({**base, "verify": {"provider": "ssh", "publicKeys": ["nope"]}})
    spec = GitSourceSpec.model_validate({**base, "verify": {"provider": "ssh", "publicKeys": [
        keys["alice"].public], "secretRef": {"name": "more-keys"}}})
    assert spec.verify is not None and spec.verify.mode == "HEAD"
    assert GitSourceSpec.model_validate({**base, "verify": {"publicKeys": [keys["bob"].public]}}
                                        ).verify is not None  # openpgp is the default, as in Flux
    assert key_problem("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== x", VerifyProvider.SSH) is not None
    assert key_problem(keys["alice"].public, VerifyProvider.SSH) is None


# ---------------------------------------------------------------------- the reconciler


def verified_env(tmp_path: Path, public: str, provider: str) -> tuple[Env, Repo]:
    env = Env(tmp_path, verify={"provider": provider, "publicKeys": [public]})
    repo = Repo(tmp_path / "signed")
    env.edit({"spec": {"url": str(repo.bare)}})
    return env, repo


def test_reconciler_refuses_what_does_not_verify(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    alice = keys["alice"]
    env, repo = verified_env(tmp_path, alice.public, "ssh")
    good = repo.commit({"fleet/a.yaml": vm("a")}, alice)
    assert env.run().state == "applied"
    assert env.cond("SourceVerified")["status"] == "True"
    assert fingerprint(alice.public) in env.cond("SourceVerified")["message"]

    for key, reason in ((None, "UnsignedCommit"), (keys["mallory"], "UntrustedKey")):
        bad = repo.commit({"fleet/a.yaml": vm("a", cpus=4), "fleet/b.yaml": vm("b")}, key)
        env.applier.calls.clear()
        r = env.run()
        assert r.state == "stalled" and r.commit == bad
        assert env.applier.calls == []  # not even listed, let alone applied or pruned
        assert env.names() == {"a"} and env.applier.objects[next(iter(env.applier.objects))][
            "spec"]["cpus"] == 1
        sv, ready = env.cond("SourceVerified"), env.cond("Ready")
        assert sv["status"] == "False" and sv["reason"] == reason
        assert ready["status"] == "False" and ready["reason"] == reason
        assert bad[:12] in ready["message"] and "spec.verify.publicKeys" in ready["message"]
        assert f"the last applied commit {good[:12]} stays in place" in ready["message"]
        assert env.status["lastAppliedCommit"] == good
        assert env.cond("Stalled")["status"] == "True"
        assert ("Warning", reason) in {(t, rs) for t, rs, _ in env.events}

    fixed = repo.commit({"fleet/a.yaml": vm("a", cpus=2)}, alice)
    assert env.run().state == "applied"
    assert env.status["lastAppliedCommit"] == fixed and env.cond("SourceVerified")["status"] == "True"
    # Dropping spec.verify drops its condition.
    env.edit({"spec": {"verify": None}})
    env.run()
    assert "SourceVerified" not in {c["type"] for c in env.status["conditions"]}


def test_reconciler_reports_a_bad_key_without_losing_state(tmp_path: Path,
                                                           keys: dict[str, SigningKey]) -> None:
    bob = keys["bob"]
    env, repo = verified_env(tmp_path, bob.public, "openpgp")
    good = repo.commit({"fleet/a.yaml": vm("a")}, bob)
    assert env.run().state == "applied"
    # An edit that breaks the key: refused with the field named, nothing lost.
    env.edit({"spec": {"verify": {"publicKeys": [bob.public[:80]]}}})
    repo.commit({"fleet/b.yaml": vm("b")}, bob)
    assert env.run().state == "stalled"
    msg = env.cond("Ready")["message"]
    assert env.cond("Ready")["reason"] == "InvalidPublicKey" and "spec.verify.publicKeys[0]" in msg
    assert "export it again" in msg and env.cond("SourceVerified")["reason"] == "InvalidPublicKey"
    assert env.names() == {"a"} and env.status["lastAppliedCommit"] == good
    # A key of the wrong kind is caught by the spec's own validation.
    env.edit({"spec": {"verify": {"publicKeys": [keys["alice"].public]}}})
    assert env.run().state == "stalled"
    msg = env.cond("Ready")["message"]
    assert env.cond("Ready")["reason"] == "InvalidSpec" and "spec.verify.publicKeys[0]" in msg, msg
    assert "set provider: ssh" in msg and keys["alice"].public.split()[1] not in msg
    assert env.names() == {"a"} and env.status["lastAppliedCommit"] == good
    assert [e["name"] for e in env.status["inventory"]] == ["a"]
