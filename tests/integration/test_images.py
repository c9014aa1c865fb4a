"""The node image cache and per-VM overlays against real tools: a loopback HTTP server, qemu-img,
qemu-io and nix. No API server is needed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfleet.reconcilers.images import (
    ImageCache,
    ImageError,
    ImageSource,
    Pull,
    create_overlay,
    image_format,
    overlay_backing,
    remove_disks,
)
from tests.fileserver import FileServer

MiB = 1 << 20
NIX = ["nix", "--extra-experimental-features", "nix-command"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "www"
    root.mkdir()
    srv = FileServer(root)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """The allowed root for path images."""
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def cache(tmp_path: Path, images: Path) -> Iterator[ImageCache]:
    c = ImageCache(tmp_path / "cache", max_bytes=1 << 30, allowed_roots=[images], http_timeout=5,
                   retry_base=0.2, retry_max=1.0)
    try:
        yield c
    finally:
        c.close()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def poll(cache: ImageCache, src: ImageSource, until: set[str], timeout: float = 20) -> list[Pull]:
    """request() repeatedly, as a VM loop would, until the state is in ``until``; all snapshots."""
    seen: list[Pull] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = cache.request(src)
        seen.append(p)
        if p.state in until:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"still {seen[-1]} after {timeout} s")


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=120)


# ------------------------------------------------------------------ URL images
def test_url_download_verified_stored_read_only_and_remembered(
        tmp_path: Path, server: FileServer, cache: ImageCache) -> None:
    digest = random_file(server.root / "big.img", 128 * MiB)
    src = ImageSource("url", server.url("big.img"), sha256=digest)
    assert src.key == f"sha256:{digest}"
    t0 = time.monotonic()
    path = cache.ensure(src, timeout=120)
    elapsed = time.monotonic() - t0
    print(f"\nloopback download + sha256 of 128 MiB: {elapsed:.2f} s = {128 / elapsed:.0f} MiB/s")
    assert path == cache.root / "blobs" / "sha256" / digest
    assert sha256(path) == digest
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert not list((cache.root / "tmp").iterdir())
    index = json.loads((cache.root / "index.json").read_text())
    assert index["images"][src.key]["digest"] == digest
    assert index["images"][src.key]["size"] == 128 * MiB
    # Cached: no second download, also not for a fresh cache over the same directory (an agent restart).
    assert cache.request(src).state == "ready"
    again = ImageCache(cache.root, max_bytes=1 << 30, allowed_roots=[tmp_path])
    p = again.request(src)
    assert (p.state, p.path, p.progress()) == ("ready", path, "128.0 MiB of 128.0 MiB (100%)")
    assert server.hits["big.img"] == 1
    [entry] = again.entries()
    assert (entry.key, entry.digest, entry.size_bytes, entry.path) == (src.key, digest, 128 * MiB, path)
    assert entry.source == server.url("big.img")


def test_checksum_mismatch_names_both_digests_and_hides_credentials(
        server: FileServer, cache: ImageCache) -> None:
    actual = random_file(server.root / "a.img", MiB)
    declared = "0" * 64
    src = ImageSource("url", server.url("a.img", userinfo="robot:s3cret@") + "?token=t0ps3cret",
                      sha256=declared)
    p = poll(cache, src, {"failed"})[-1]
    assert p.error is not None
    assert (p.error.reason, p.error.transient, p.retry_at) == ("ChecksumMismatch", False, None)
    msg = str(p.error)
    assert "spec.image.sha256" in msg and declared in msg and actual in msg
    assert server.url("a.img") in msg
    assert "s3cret" not in msg and "robot" not in msg and "t0ps3cret" not in msg
    assert not list((cache.root / "tmp").iterdir())
    assert not (cache.root / "blobs" / "sha256" / declared).exists()
    # Not transient: it stays failed, without downloading again, until forgotten.
    time.sleep(0.3)
    assert cache.request(src).state == "failed"
    assert server.hits["a.img"] == 1
    cache.forget(src.key)
    assert poll(cache, src, {"failed"})[-1].state == "failed"
    assert server.hits["a.img"] == 2
    with pytest.raises(ImageError) as info:
        cache.ensure(src, timeout=5)
    assert info.value.reason == "ChecksumMismatch"


def test_unreachable_is_transient_with_backoff(cache: ImageCache) -> None:
    src = ImageSource("url", f"http://127.0.0.1:{closed_port()}/x.img", sha256="1" * 64)
    p = poll(cache, src, {"failed"})[-1]
    assert p.error is not None
    assert (p.error.reason, p.error.transient, p.attempts) == ("Unreachable", True, 1)
    assert "connection refused" in str(p.error)
    assert p.retry_at is not None and p.retry_at > time.monotonic() - 1
    # Before retry_at a request does not start another attempt; after it, one does (backoff doubles).
    assert cache.request(src).attempts == 1
    time.sleep(max(0.0, p.retry_at - time.monotonic()) + 0.01)
    assert cache.request(src).attempts == 2
    p2 = poll(cache, src, {"failed"})[-1]
    assert p2.attempts == 2 and p2.retry_at is not None
    assert p2.retry_at - time.monotonic() > 0.2  # 0.4 s after the second failure
    with pytest.raises(ImageError) as info:
        cache.ensure(src, timeout=1.5)
    assert info.value.reason == "Unreachable"


def test_404_is_not_transient(server: FileServer, cache: ImageCache) -> None:
    src = ImageSource("url", server.url("missing.img"), sha256="2" * 64)
    p = poll(cache, src, {"failed"})[-1]
    assert p.error is not None
    assert (p.error.reason, p.error.transient) == ("NotFound", False)
    assert "HTTP 404" in str(p.error)


def test_5xx_is_retried_until_it_works(server: FileServer, cache: ImageCache) -> None:
    digest = random_file(server.root / "flaky.img", MiB)
    server.fail_first["flaky.img"] = 2
    src = ImageSource("url", server.url("flaky.img"), sha256=digest)
    seen = poll(cache, src, {"ready"}, timeout=15)
    failures = {(p.attempts, p.error.reason, p.error.transient) for p in seen if p.error is not None}
    assert failures == {(1, "Unreachable", True), (2, "Unreachable", True)}
    assert any("HTTP 500" in str(p.error) for p in seen if p.error)
    assert server.hits["flaky.img"] == 3
    assert seen[-1].path is not None and sha256(seen[-1].path) == digest


def test_progress_is_visible_while_polling(server: FileServer, cache: ImageCache) -> None:
    digest = random_file(server.root / "slow.img", 4 * MiB)
    server.slow["slow.img"] = 0.005  # ~12 MiB/s
    src = ImageSource("url", server.url("slow.img"), sha256=digest)
    seen = poll(cache, src, {"ready"}, timeout=30)
    partial = [p for p in seen if p.state == "pulling" and p.total_bytes and 0 < p.done_bytes < p.total_bytes]
    assert partial, [p.progress() for p in seen]
    assert all(p.total_bytes == 4 * MiB for p in partial)
    done = [p.done_bytes for p in partial]
    assert done == sorted(done)
    sample = partial[0].progress()
    assert sample.endswith("%)") and " MiB of 4.0 MiB (" in sample


def test_concurrent_requests_share_one_download(server: FileServer, cache: ImageCache) -> None:
    digest = random_file(server.root / "shared.img", 2 * MiB)
    server.slow["shared.img"] = 0.002
    src = ImageSource("url", server.url("shared.img"), sha256=digest)
    barrier = threading.Barrier(8)
    got: list[Pull] = []

    def vm_loop() -> None:
        barrier.wait()
        got.append(cache.request(src))

    threads = [threading.Thread(target=vm_loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {p.state for p in got} <= {"pulling", "ready"} and len(got) == 8
    paths = {cache.ensure(src, timeout=30) for _ in range(3)}
    assert len(paths) == 1
    assert server.hits["shared.img"] == 1


# ------------------------------------------------------------------ path images
def test_path_image_copied_once_and_hashed_once(
        images: Path, cache: ImageCache, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real_hash = cache._hash_file

    def counting_hash(path: Path | str, pull: Pull, size: int) -> str:
        hashed.append(str(path))
        return real_hash(path, pull, size)

    monkeypatch.setattr(cache, "_hash_file", counting_hash)
    f = images / "base.img"
    digest = random_file(f, 64 * MiB)
    src = ImageSource("path", str(f))
    assert src.key == f"path:{f}"
    t0 = time.monotonic()
    path = cache.ensure(src)
    elapsed = time.monotonic() - t0
    print(f"\npath import (copy_file_range + sha256) of 64 MiB: {elapsed:.2f} s = {64 / elapsed:.0f} MiB/s")
    assert path.name == digest and sha256(path) == digest and len(hashed) == 1
    # Evicted and asked for again: copied again, but an unchanged file is not hashed again.
    cache.max_bytes = 0
    assert cache.gc(in_use=()) == [src.key]
    assert not path.exists()
    assert cache.ensure(src) == path and len(hashed) == 1
    # The file changes: the new content is imported; the old bytes stay accountable under their digest.
    with open(f, "ab") as fh:
        fh.write(b"more")
    new = cache.ensure(src)
    assert new != path and new.name == sha256(f) and len(hashed) == 2
    assert {e.key for e in cache.entries()} == {src.key, f"sha256:{digest}"}
    # Declared digest: the key is the content; a path with the wrong one is refused.
    good = ImageSource("path", str(f), sha256=sha256(f))
    assert good.key == f"sha256:{sha256(f)}" and cache.ensure(good) == new
    bad = ImageSource("path", str(f), sha256="3" * 64)
    with pytest.raises(ImageError) as info:
        cache.ensure(bad)
    assert info.value.reason == "ChecksumMismatch" and not info.value.transient


def test_path_images_are_confined(images: Path, tmp_path: Path, cache: ImageCache) -> None:
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"secret")
    (images / "link.img").symlink_to(outside)
    cases = {
        "/proc/self/mem": ("PathRefused", "never allowed"),
        "/etc/shadow": ("PathRefused", "outside the allowed roots"),
        str(images / "link.img"): ("PathRefused", "is a symlink leading to"),
        f"{images}/../outside.img": ("PathRefused", "'..'"),
        str(images / "nope.img"): ("NotFound", "does not exist"),
    }
    for location, (reason, why) in cases.items():
        p = cache.request(ImageSource("path", location))
        assert p.state == "failed" and p.error is not None, location
        assert (p.error.reason, p.error.transient) == (reason, False), location
        assert why in str(p.error) and "spec.image.path" in str(p.error), location
    assert not list((cache.root / "blobs" / "sha256").iterdir())
    # Refusals are re-checked on every request: a file that appears later is simply picked up.
    (images / "nope.img").write_bytes(b"now here")
    assert cache.ensure(ImageSource("path", str(images / "nope.img"))).read_bytes() == b"now here"


def test_invalid_sources(cache: ImageCache) -> None:
    for src, text in [
        (ImageSource("url", "http://127.0.0.1/x.img"), "sha256 is required"),
        (ImageSource("url", "file:///etc/passwd", sha256="4" * 64), "http:// or https://"),
        (ImageSource("url", "https://example.org/x", sha256="xyz"), "not 64 hex digits"),
        (ImageSource("nix", "/nix/store/short-name"), "not a store path"),
        (ImageSource("nix", "/nix/store/" + "a" * 32 + "-x", file="../../etc/passwd"), "relative path"),
        (ImageSource("nix", "/nix/store/" + "a" * 32 + "-x", nix_cache="ssh://evil"), "binary cache URL"),
    ]:
        p = cache.request(src)
        assert p.error is not None and p.error.reason == "Invalid", src
        assert text in str(p.error), (src, str(p.error))


# ------------------------------------------------------------------ GC
def test_gc_evicts_lru_and_never_in_use(images: Path, server: FileServer, cache: ImageCache) -> None:
    srcs = []
    for name, size in (("a.img", 1), ("b.img", 2), ("c.img", 3)):
        random_file(images / name, size * MiB)
        srcs.append(ImageSource("path", str(images / name)))
        cache.ensure(srcs[-1])
        time.sleep(0.01)
    a, b, c = srcs
    # The same bytes as a.img through a URL: one blob, counted once.
    shutil.copy(images / "a.img", server.root / "a.img")
    a_url = ImageSource("url", server.url("a.img"), sha256=sha256(images / "a.img"))
    cache.ensure(a_url)
    assert cache.total_bytes() == 6 * MiB and server.hits["a.img"] == 0  # content-addressed hit
    cache.touch(a.key)  # a is now the most recently used of the path images, b the least
    assert cache.entries()[0].key == a.key
    cache.max_bytes = 4 * MiB
    assert cache.gc(in_use={c.key}) == [b.key]
    assert cache.total_bytes() == 4 * MiB
    blobs = cache.root / "blobs" / "sha256"
    kept = sorted([sha256(images / "a.img"), sha256(images / "c.img")])
    assert sorted(p.name for p in blobs.iterdir()) == kept
    # Over the limit with everything in use: nothing is evicted.
    cache.max_bytes = 0
    assert cache.gc(in_use={a.key, a_url.key, c.key}) == []
    # Dropping one key of a shared blob keeps the blob for the other.
    assert cache.gc(in_use={a.key}) == [c.key, a_url.key]
    assert (blobs / sha256(images / "a.img")).exists() and cache.total_bytes() == MiB
    # A digest protects every key holding those bytes.
    assert cache.gc(in_use={f"sha256:{sha256(images / 'a.img')}"}) == []
    assert cache.gc(in_use=()) == [a.key]
    assert not list(blobs.iterdir()) and cache.total_bytes() == 0
    assert json.loads((cache.root / "index.json").read_text())["images"] == {}


# ------------------------------------------------------------------ overlays
def qemu_io(img: Path, fmt: str, command: str) -> subprocess.CompletedProcess[str]:
    return run("qemu-io", "-f", fmt, "-c", command, img, check=False)


@pytest.fixture
def bases(tmp_path: Path) -> dict[str, Path]:
    """A qcow2 and a raw base image, made by qemu-img and holding a known pattern at offset 0."""
    d = tmp_path / "bases"
    d.mkdir()
    out = {}
    for fmt in ("qcow2", "raw"):
        img = d / f"base.{fmt}"
        run("qemu-img", "create", "-q", "-f", fmt, img, "16M")
        assert qemu_io(img, fmt, "write -P 0x11 0 64k").returncode == 0
        out[fmt] = img
    return out


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_overlay_is_copy_on_write(tmp_path: Path, bases: dict[str, Path], fmt: str) -> None:
    base = bases[fmt]
    before = sha256(base)
    assert image_format(base) == fmt
    disks = tmp_path / "vms" / "vm-1" / "disks"
    one, two = disks / "root.qcow2", tmp_path / "vms" / "vm-2" / "disks" / "root.qcow2"
    assert create_overlay(base, one) is True
    assert create_overlay(base, one) is False  # idempotent: the agent may retry
    assert create_overlay(base, two, base_format=fmt, size_bytes=32 * MiB) is True
    assert stat.S_IMODE(disks.stat().st_mode) == 0o700
    assert not [p for p in disks.iterdir() if p.name.endswith(".tmp")]
    info = json.loads(run("qemu-img", "info", "--output=json", one).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == fmt and info["virtual-size"] == 16 * MiB
    assert json.loads(run("qemu-img", "info", "--output=json", two).stdout)["virtual-size"] == 32 * MiB
    assert overlay_backing(one) == base and overlay_backing(base) is None
    size_before = one.stat().st_size
    # The guest writes: into its overlay only.
    assert qemu_io(one, "qcow2", "write -P 0xab 0 4k").returncode == 0
    assert "Pattern verification failed" not in qemu_io(one, "qcow2", "read -P 0xab 0 4k").stdout
    assert "Pattern verification failed" not in qemu_io(two, "qcow2", "read -P 0x11 0 4k").stdout
    assert "Pattern verification failed" not in qemu_io(base, fmt, "read -P 0x11 0 4k").stdout
    assert sha256(base) == before
    assert one.stat().st_size > size_before and one.stat().st_size < 2 * MiB
    assert not os.path.samefile(one, two) and sha256(one) != sha256(two)
    # A disk over another base is never replaced.
    other = tmp_path / "other.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", other, "16M")
    with pytest.raises(ImageError) as info_:
        create_overlay(other, one)
    assert info_.value.reason == "Invalid" and "refusing to replace" in str(info_.value)
    remove_disks(disks.parent)
    remove_disks(disks.parent)  # already gone: fine
    assert not disks.parent.exists() and two.exists() and sha256(base) == before


def test_overlay_over_a_cached_blob(server: FileServer, cache: ImageCache, bases: dict[str, Path],
                                    tmp_path: Path) -> None:
    shutil.copy(bases["qcow2"], server.root / "base.qcow2")
    src = ImageSource("url", server.url("base.qcow2"), sha256=sha256(bases["qcow2"]))
    blob = cache.ensure(src)
    disk = tmp_path / "vm" / "root.qcow2"
    assert create_overlay(blob, disk) and overlay_backing(disk) == blob
    assert qemu_io(disk, "qcow2", "write -P 0xcd 0 64k").returncode == 0
    assert sha256(blob) == src.sha256
    assert cache.gc(in_use={f"sha256:{sha256(blob)}"}) == []


def test_unsupported_and_chained_bases_are_refused(tmp_path: Path, bases: dict[str, Path]) -> None:
    vmdk = tmp_path / "x.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", vmdk, "1M")
    with pytest.raises(ImageError, match="only qcow2 and raw"):
        image_format(vmdk)
    # A qcow2 naming a host file as its backing file would show that file to the guest.
    chained = tmp_path / "chained.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", bases["raw"], chained)
    with pytest.raises(ImageError, match="must be self-contained"):
        create_overlay(chained, tmp_path / "vm" / "root.qcow2")
    assert image_format(chained, allow_backing=True) == "qcow2"
    with pytest.raises(ImageError, match="smaller than the image"):
        create_overlay(bases["raw"], tmp_path / "vm" / "small.qcow2", size_bytes=MiB)
    assert not (tmp_path / "vm" / "small.qcow2").exists()


# ------------------------------------------------------------------ nix
@pytest.fixture
def store_paths(cache: ImageCache) -> Iterator[list[str]]:
    """Store paths a test made; afterwards unrooted and deleted, so the store is left as found."""
    made: list[str] = []
    yield made
    for link in (cache.root / "gcroots").iterdir():
        link.unlink()
    for p in reversed(made):
        run("nix-store", "--delete", p, check=False)


def qcow2_in_store(tmp_path: Path, store_paths: list[str]) -> tuple[str, Path]:
    img = tmp_path / f"hf-test-{uuid.uuid4().hex[:8]}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
    assert qemu_io(img, "qcow2", "write -P 0x5a 0 64k").returncode == 0
    path = run("nix-store", "--add", img).stdout.strip()
    store_paths.append(path)
    return path, img


def is_valid(path: str) -> bool:
    return run("nix-store", "--check-validity", path, check=False).returncode == 0


def test_nix_image_realised_from_a_loopback_binary_cache(
        tmp_path: Path, server: FileServer, cache: ImageCache, store_paths: list[str]) -> None:
    path, img = qcow2_in_store(tmp_path, store_paths)
    run(*NIX, "copy", "--to", f"file://{server.root}/nixcache", path)
    run("nix-store", "--delete", path)  # nothing roots it: gone from the store, only in the cache now
    assert not is_valid(path)
    src = ImageSource("nix", path, nix_cache=server.url("nixcache"))
    assert src.key == f"nix:{path}"
    seen = poll(cache, src, {"ready", "failed"}, timeout=60)
    assert seen[-1].state == "ready", seen[-1].error
    image = seen[-1].path
    assert image == Path(path) and is_valid(path) and sha256(image) == sha256(img)
    assert server.hits[f"nixcache/{Path(path).name[:32]}.narinfo"] == 1
    # Not copied into the blobs; rooted so nix's GC leaves it alone while cached.
    assert not list((cache.root / "blobs" / "sha256").iterdir())
    [root] = list((cache.root / "gcroots").iterdir())
    assert os.readlink(root) == path
    assert str(root) in run("nix-store", "--query", "--roots", path).stdout
    assert "still alive" in run("nix-store", "--delete", path, check=False).stderr
    [entry] = cache.entries()
    assert (entry.digest, entry.path, entry.size_bytes) == (sha256(img), image, img.stat().st_size)
    # A VM disk over the store file.
    disk = tmp_path / "vm" / "root.qcow2"
    assert image_format(image) == "qcow2" and create_overlay(image, disk)
    assert overlay_backing(disk) == image
    # Evicted: the root goes and nix may collect the path again.
    cache.max_bytes = 0
    assert cache.gc(in_use=()) == [src.key]
    assert not root.exists()
    assert run("nix-store", "--delete", path, check=False).returncode == 0


def test_nix_file_inside_a_store_directory(tmp_path: Path, cache: ImageCache, store_paths: list[str]) -> None:
    d = tmp_path / f"hf-test-dir-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", d / "nixos.qcow2", "16M")
    (d / "escape").symlink_to("/etc/passwd")
    path = run("nix-store", "--add", d).stdout.strip()
    store_paths.append(path)
    ok = ImageSource("nix", path, file="nixos.qcow2")
    assert ok.key == f"nix:{path}/nixos.qcow2"
    assert cache.ensure(ok, timeout=60) == Path(path) / "nixos.qcow2"  # valid locally: no cache needed
    with pytest.raises(ImageError) as info:
        cache.ensure(ImageSource("nix", path, file="escape"), timeout=60)
    assert info.value.reason == "PathRefused" and "symlink leading to /etc/passwd" in str(info.value)
    with pytest.raises(ImageError) as info:
        cache.ensure(ImageSource("nix", path), timeout=60)
    assert info.value.reason == "Invalid" and "spec.image.file" in str(info.value)
    assert len(list((cache.root / "gcroots").iterdir())) == 1  # failed attempts leave no root


def test_nix_unsigned_cache_needs_trust_for_input_addressed_paths(
        tmp_path: Path, server: FileServer, cache: ImageCache, store_paths: list[str]) -> None:
    """A built (input-addressed) image from an unsigned cache: refused unless the agent trusts it."""
    name = f"hf-test-built-{uuid.uuid4().hex[:8]}.qcow2"
    expr = (f'derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; '
            f'args = ["-c" "{shutil.which("qemu-img")} create -q -f qcow2 $out 16M"]; }}')
    path = run("nix-build", "--no-out-link", "--option", "substituters", "", "-E", expr).stdout.strip()
    drv = run("nix-store", "--query", "--deriver", path).stdout.strip()
    store_paths.extend([drv, path])
    run(*NIX, "copy", "--to", f"file://{server.root}/nixcache", path)
    run("nix-store", "--delete", path)
    src = ImageSource("nix", path, nix_cache=server.url("nixcache"))
    p = poll(cache, src, {"ready", "failed"}, timeout=60)[-1]
    assert p.error is not None
    assert (p.error.reason, p.error.transient) == ("NixError", False)
    assert "lacks a valid signature" in str(p.error) and "trusted-public-keys" in str(p.error)
    trusting = ImageCache(tmp_path / "cache2", max_bytes=1 << 30, nix_trust_unsigned=True)
    try:
        assert trusting.ensure(src, timeout=60) == Path(path)
    finally:
        trusting.close()
        for link in (tmp_path / "cache2" / "gcroots").iterdir():
            link.unlink()
