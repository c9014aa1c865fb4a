"""Host path confinement: the inputs issue #12 names, each refused (or allowed) for the right reason."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from hyperfleet.reconcilers.images import DEFAULT_ROOTS, PathRefused, confine

FIELD = "spec.image.path"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "hf"
    (r / "images").mkdir(parents=True)
    (r / "images" / "base.qcow2").write_bytes(b"image")
    return r


def refused(path: str, roots: Sequence[Path | str], **kw: object) -> PathRefused:
    with pytest.raises(PathRefused) as info:
        confine(path, roots, FIELD, **kw)  # type: ignore[arg-type]
    exc = info.value
    text = str(exc)
    assert "\n" not in text
    assert exc.field == FIELD and exc.path == path
    assert text.startswith(f"{FIELD}: host path {path!r} refused: ")
    assert "allowed roots: " in text and "fix: " in text
    return exc


def test_proc_self_mem_is_refused_even_under_a_root_of_slash(root: Path) -> None:
    roots: Sequence[Path | str]
    for roots in ([root], ["/"]):
        exc = refused("/proc/self/mem", roots)
        assert "is under /proc, which is never allowed" in exc.why


def test_relative_escape_is_refused(root: Path) -> None:
    exc = refused("../../etc/shadow", [root])
    assert exc.why == "is not an absolute path"


def test_service_account_token_is_refused() -> None:
    exc = refused("/var/run/secrets/kubernetes.io/serviceaccount/token", list(DEFAULT_ROOTS))
    assert exc.why == "is outside the allowed roots"
    assert "/var/lib/hyperfleet, /nix/store" in str(exc)
    assert "--allowed-path-root" in str(exc)
    # Existence is never revealed for a path outside the roots.
    exc = refused("/var/run/secrets/kubernetes.io/serviceaccount/token", list(DEFAULT_ROOTS),
                  must_exist=False)
    assert exc.why == "is outside the allowed roots"


def test_dotdot_is_refused_even_when_it_would_land_inside(root: Path) -> None:
    exc = refused(f"{root}/../etc/passwd", [root])
    assert exc.why == "contains a '..' component"
    exc = refused(f"{root}/images/../images/base.qcow2", [root])
    assert exc.why == "contains a '..' component"


def test_sys_and_dev_are_refused(root: Path) -> None:
    exc = refused("/sys/kernel/mm/transparent_hugepage/enabled", ["/"])
    assert "is under /sys" in exc.why
    exc = refused("/dev/sda", ["/"], must_exist=False)
    assert "is under /dev" in exc.why
    exc = refused("/dev/sda", [root], must_exist=False)
    assert "is under /dev" in exc.why


def test_an_explicitly_allowed_device_passes(root: Path) -> None:
    assert confine("/dev/null", [root], FIELD, allowed_devices=["/dev/null"]) == Path("/dev/null")
    sda = confine("/dev/sda", [root], FIELD, must_exist=False, allowed_devices=["/dev/sda"])
    assert sda == Path("/dev/sda")
    refused("/dev/zero", [root], allowed_devices=["/dev/null"])


def test_symlink_inside_a_root_leading_outside_is_refused(root: Path) -> None:
    link = root / "images" / "innocent.qcow2"
    link.symlink_to("/etc/passwd")
    exc = refused(str(link), [root])
    assert exc.why == "is a symlink leading to /etc/passwd outside the allowed roots"
    # A symlinked directory in the middle of the path is followed too.
    (root / "etc").symlink_to("/etc")
    exc = refused(f"{root}/etc/passwd", [root])
    assert "symlink leading to /etc/passwd" in exc.why
    # ... and a link into /proc is refused as /proc, whatever the roots.
    (root / "mem").symlink_to("/proc/self/mem")
    exc = refused(f"{root}/mem", ["/"])
    assert "is under /proc" in exc.why and "symlink" in exc.why


def test_sibling_with_the_root_as_name_prefix_is_outside(root: Path) -> None:
    evil = root.parent / (root.name + "-evil")
    evil.mkdir()
    (evil / "x.qcow2").write_bytes(b"x")
    exc = refused(str(evil / "x.qcow2"), [root])
    assert exc.why == "is outside the allowed roots"


def test_valid_paths_resolve(root: Path) -> None:
    base = root / "images" / "base.qcow2"
    assert confine(str(base), [root], FIELD) == base
    link = root / "current.qcow2"
    link.symlink_to(base)
    assert confine(str(link), [root], FIELD) == base
    # A root that is itself a symlink still contains its files.
    alias = root.parent / "alias"
    alias.symlink_to(root)
    assert confine(f"{alias}/images/base.qcow2", [alias], FIELD) == base
    # Several roots: any one will do.
    assert confine(str(base), ["/nonexistent-root", root], FIELD) == base


def test_missing_file(root: Path) -> None:
    exc = refused(f"{root}/images/missing.qcow2", [root])
    assert exc.why == "does not exist"
    assert f"correct {FIELD}" in exc.fix
    new = confine(f"{root}/images/new.qcow2", [root], FIELD, must_exist=False)
    assert new == root / "images" / "new.qcow2"


def test_empty_nul_and_relative_roots(root: Path) -> None:
    assert refused("", [root]).why == "is empty"
    assert refused(f"{root}/images/base.qcow2\0.txt", [root]).why == "contains a NUL byte"
    with pytest.raises(ValueError, match="not an absolute path"):
        confine(str(root), ["relative/root"], FIELD)


def test_refusal_is_a_value_error(root: Path) -> None:
    with pytest.raises(ValueError):
        confine("/etc/shadow", [root], FIELD)
    assert os.path.exists("/etc/shadow")
