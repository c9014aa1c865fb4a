"""The git client: real repositories on disk and a real smart-HTTP server with token auth."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from git import GitCommandError

from hyperfleet.reconcilers.gitops import fetch as fetch_mod
from hyperfleet.reconcilers.gitops.fetch import (
    Credentials,
    FetchError,
    GitFetcher,
    PathNotFound,
    is_ssh_url,
    scrub,
)
from hyperfleet.reconcilers.models.gitsource import GitRef

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
TOKEN = "ghp_ThisIsTheTokenValue123"


def git(*args: str, cwd: Path) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class Remote:
    """A bare repository plus a working clone to commit and push from."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "remote.git"
        self.work = root / "work"
        root.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        git("init", "-q", "-b", "main", str(self.work), cwd=root)
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    def commit(self, files: dict[str, str | None], message: str = "c", push: str = "main",
               force: bool = False) -> str:
        for rel, text in files.items():
            p = self.work / rel
            if text is None:
                p.unlink()
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        git("push", "-q", *(["--force"] if force else []), "origin", f"HEAD:{push}", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)


class GitHttpServer:
    """`git http-backend` (smart HTTP) behind Basic auth, like a forge with a token."""

    def __init__(self, root: Path, token: str | None) -> None:
        self.root = root
        self.token = token
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                self._cgi()

            def do_POST(self) -> None:
                self._cgi()

            def _cgi(self) -> None:
                outer.paths.append(self.path)
                if outer.token is not None:
                    auth = self.headers.get("Authorization", "")
                    ok = auth.startswith("Basic ") and base64.b64decode(auth[6:]).decode() \
                        .split(":", 1)[-1] == outer.token
                    if not ok:
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", 'Basic realm="git"')
                        self.end_headers()
                        return
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                env = {**os.environ, "GIT_PROJECT_ROOT": str(outer.root), "GIT_HTTP_EXPORT_ALL": "1",
                       "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                       "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "u", "REMOTE_ADDR": "127.0.0.1",
                       "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}
                if self.headers.get("Content-Encoding") == "gzip":
                    env["HTTP_CONTENT_ENCODING"] = "gzip"
                out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                                     check=False).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                status = 200
                headers = []
                for line in head.decode().split("\r\n"):
                    k, _, v = line.partition(": ")
                    if k.lower() == "status":
                        status = int(v.split()[0])
                    elif k:
                        headers.append((k, v))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> GitHttpServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return Remote(tmp_path / "repo")


@pytest.fixture
def fetcher(tmp_path: Path) -> GitFetcher:
    return GitFetcher(tmp_path / "cache")


def test_branch_first_fetch_is_shallow_then_incremental(remote: Remote, fetcher: GitFetcher) -> None:
    remote.commit({"fleet/a.yaml": "a: 1\n"})
    c2 = remote.commit({"fleet/b.yaml": "b: 1\n"})
    got = fetcher.fetch("ns/f", str(remote.bare), GitRef(branch="main"))
    assert got.commit == c2 and got.previous is None and not got.rewritten
    cache = fetcher.cache_path("ns/f", str(remote.bare))
    assert (cache / "shallow").exists()
    assert git("rev-list", "--count", "refs/hyperfleet/target", cwd=cache) == "1"
    c3 = remote.commit({"fleet/a.yaml": "a: 2\n"})
    got = fetcher.fetch("ns/f", str(remote.bare), GitRef(branch="main"))
    assert got.commit == c3 and got.previous == c2 and not got.rewritten


def test_force_push_is_detected_and_followed(remote: Remote, fetcher: GitFetcher) -> None:
    base = remote.commit({"a.yaml": "x: 1\n"})
    remote.commit({"a.yaml": "x: 2\n"})
    fetcher.fetch("ns/f", str(remote.bare), None)
    git("reset", "-q", "--hard", base, cwd=remote.work)
    new = remote.commit({"a.yaml": "x: 3\n"}, force=True)
    got = fetcher.fetch("ns/f", str(remote.bare), None)
    assert got.commit == new and got.rewritten
    assert fetcher.manifest_files("ns/f", str(remote.bare), new, ".") == {"a.yaml": b"x: 3\n"}


def test_tag_commit_and_default_head(remote: Remote, fetcher: GitFetcher) -> None:
    c1 = remote.commit({"a.yaml": "v: 1\n"})
    git("tag", "-a", "v1", "-m", "v1", cwd=remote.work)
    git("push", "-q", "origin", "v1", cwd=remote.work)
    c2 = remote.commit({"a.yaml": "v: 2\n"})
    url = f"file://{remote.bare}"
    assert fetcher.fetch("ns/t", url, GitRef(tag="v1")).commit == c1  # annotated tag peeled
    assert fetcher.fetch("ns/h", url, None).commit == c2
    # A commit that is no branch tip: fetched by SHA, or via a full fetch if refused.
    assert fetcher.fetch("ns/c", url, GitRef(commit=c1)).commit == c1
    assert fetcher.fetch("ns/c", url, GitRef(commit=c1)).commit == c1  # cached: no network
    with pytest.raises(FetchError, match="not in") as e:
        fetcher.fetch("ns/x", url, GitRef(commit="f" * 40))
    assert not e.value.transient


def test_missing_branch_and_unreachable_remote(remote: Remote, fetcher: GitFetcher, tmp_path: Path) -> None:
    remote.commit({"a.yaml": "x: 1\n"})
    with pytest.raises(FetchError, match="branch nope not found") as e:
        fetcher.fetch("ns/f", str(remote.bare), GitRef(branch="nope"))
    assert not e.value.transient and e.value.reason == "RevisionNotFound"
    with pytest.raises(FetchError, match="does not appear to be a git repository") as e:
        fetcher.fetch("ns/g", str(tmp_path / "gone.git"), None)
    assert e.value.transient


def test_manifest_files_path_filters(remote: Remote, fetcher: GitFetcher) -> None:
    c = remote.commit({"fleet/a.yaml": "a\n", "fleet/sub/b.yml": "b\n", "fleet/.hidden/c.yaml": "c\n",
                       "fleet/notes.md": "n\n", "other/d.yaml": "d\n", ".github/w.yml": "w\n"})
    os.symlink("a.yaml", remote.work / "fleet" / "link.yaml")
    c = remote.commit({}, "symlink")
    fetcher.fetch("ns/f", str(remote.bare), None)
    url = str(remote.bare)
    assert set(fetcher.manifest_files("ns/f", url, c, "fleet")) == {"fleet/a.yaml", "fleet/sub/b.yml"}
    assert set(fetcher.manifest_files("ns/f", url, c, ".")) == {
        "fleet/a.yaml", "fleet/sub/b.yml", "other/d.yaml"}
    with pytest.raises(PathNotFound, match="'clusters' does not exist"):
        fetcher.manifest_files("ns/f", url, c, "clusters")
    with pytest.raises(PathNotFound, match="is a file"):
        fetcher.manifest_files("ns/f", url, c, "fleet/a.yaml")
    assert fetcher.has_file("ns/f", url, c, "fleet", "a.yaml")
    assert not fetcher.has_file("ns/f", url, c, "fleet", "flake.nix")


def test_export_writes_the_tree(remote: Remote, fetcher: GitFetcher, tmp_path: Path) -> None:
    c = remote.commit({"flake.nix": "{ }\n", "x/y.txt": "y\n"})
    fetcher.fetch("ns/f", str(remote.bare), None)
    fetcher.export("ns/f", str(remote.bare), c, tmp_path / "out")
    assert (tmp_path / "out" / "flake.nix").read_text() == "{ }\n"
    assert (tmp_path / "out" / "x" / "y.txt").read_text() == "y\n"


def test_cache_per_source_and_url(fetcher: GitFetcher) -> None:
    a = fetcher.cache_path("ns/f", "https://h/a")
    assert a != fetcher.cache_path("ns/f", "https://h/b") and a != fetcher.cache_path("ns/g", "https://h/a")


def test_http_with_token_through_askpass(remote: Remote, fetcher: GitFetcher) -> None:
    c = remote.commit({"a.yaml": "x: 1\n"})
    with GitHttpServer(remote.bare.parent, TOKEN) as srv:
        url = f"{srv.url}/remote.git"
        with pytest.raises(FetchError) as e:
            fetcher.fetch("ns/anon", url, GitRef(branch="main"))
        assert e.value.reason == "AuthenticationFailed" and not e.value.transient
        with pytest.raises(FetchError) as e:
            fetcher.fetch("ns/wrong", url, GitRef(branch="main"),
                          Credentials(username="u", password="wrong-token"))
        assert e.value.reason == "AuthenticationFailed"
        assert "wrong-token" not in str(e.value)
        got = fetcher.fetch("ns/ok", url, GitRef(branch="main"), Credentials(password=TOKEN))
        assert got.commit == c
        c2 = remote.commit({"a.yaml": "x: 2\n"})
        assert fetcher.fetch("ns/ok", url, GitRef(branch="main"), Credentials(password=TOKEN)).commit == c2
        assert all(TOKEN not in p for p in srv.paths)
    cache = fetcher.cache_path("ns/ok", url)
    assert TOKEN not in (cache / "config").read_text()
    assert not any(TOKEN.encode() in p.read_bytes() for p in cache.rglob("*") if p.is_file())


def test_credentials_from_secret() -> None:
    https = Credentials.from_secret_data({"token": TOKEN}, "git-auth", "https://h/r.git")
    assert https.password == TOKEN and https.username == "git" and TOKEN not in repr(https)
    basic = Credentials.from_secret_data({"username": "bob", "password": "pw"}, "s", "https://h/r")
    assert basic.username == "bob"
    ssh = Credentials.from_secret_data({"identity": "KEY", "known_hosts": "h ssh-ed25519 AAA"}, "s",
                                       "git@h:o/r.git")
    assert ssh.identity == "KEY\n" and "KEY" not in repr(ssh)
    with pytest.raises(FetchError, match="no `token`"):
        Credentials.from_secret_data({"identity": "K"}, "s", "https://h/r")
    with pytest.raises(FetchError, match="no `identity`"):
        Credentials.from_secret_data({"token": "t"}, "s", "ssh://git@h/r")
    with pytest.raises(FetchError, match="known_hosts"):
        Credentials.from_secret_data({"identity": "K"}, "s", "git@h:o/r")


def test_ssh_env_uses_key_file_and_strict_host_keys(fetcher: GitFetcher) -> None:
    creds = Credentials(identity="-----BEGIN KEY-----\nabc\n-----END KEY-----\n", known_hosts="h k")
    with fetcher._env(creds) as env:
        cmd = env["GIT_SSH_COMMAND"]
        key = Path(cmd.split("-i ")[1].split()[0])
        assert key.read_text() == creds.identity and (key.stat().st_mode & 0o077) == 0
        assert "StrictHostKeyChecking=yes" in cmd and "BatchMode=yes" in cmd
        assert "abc" not in str(env)
    assert not key.exists()  # removed after the fetch


def test_url_kinds_and_scrub() -> None:
    assert is_ssh_url("git@github.com:o/r.git") and is_ssh_url("ssh://git@h/r")
    assert not is_ssh_url("https://h/r") and not is_ssh_url("/srv/r.git") and not is_ssh_url("file:///r")
    text = f"fatal: https://bob:{TOKEN}@h/r failed with {TOKEN}"
    assert TOKEN not in scrub(text, [TOKEN]) and "bob" not in scrub(text, [])


def test_remove_drops_the_cache(remote: Remote, fetcher: GitFetcher) -> None:
    remote.commit({"a.yaml": "x\n"})
    fetcher.fetch("ns/f", str(remote.bare), None)
    assert fetcher.cache_path("ns/f", str(remote.bare)).exists()
    fetcher.remove("ns/f")
    assert not fetcher.cache_path("ns/f", str(remote.bare)).exists()


@pytest.fixture
def http_remote(remote: Remote) -> Iterator[tuple[Remote, str]]:
    with GitHttpServer(remote.bare.parent, None) as srv:
        yield remote, f"{srv.url}/remote.git"


def test_anonymous_http(http_remote: tuple[Remote, str], fetcher: GitFetcher) -> None:
    remote, url = http_remote
    c = remote.commit({"a.yaml": "x\n"})
    assert fetcher.fetch("ns/f", url, None).commit == c


def test_remove_spares_gitsources_whose_name_starts_alike(remote: Remote, fetcher: GitFetcher) -> None:
    remote.commit({"a.yaml": "x\n"})
    url = str(remote.bare)
    for key in ("team/prod", "team/prod-eu", "team/prod-abcdef012345"):
        fetcher.fetch(key, url, None)
    fetcher.remove("team/prod")
    assert not fetcher.cache_path("team/prod", url).exists()
    assert fetcher.cache_path("team/prod-eu", url).exists()
    assert fetcher.cache_path("team/prod-abcdef012345", url).exists()


def test_a_changed_url_drops_the_old_cache(remote: Remote, fetcher: GitFetcher) -> None:
    remote.commit({"a.yaml": "x\n"})
    old, new = str(remote.bare), f"file://{remote.bare}"
    fetcher.fetch("ns/f", old, None)
    fetcher.fetch("ns/other", old, None)
    fetcher.fetch("ns/f", new, None)
    assert fetcher.cache_path("ns/f", new).exists() and not fetcher.cache_path("ns/f", old).exists()
    assert fetcher.cache_path("ns/other", old).exists()  # another GitSource's cache stays


def _garbage(cache: Path) -> tuple[int, int]:
    """(loose objects, unreachable objects) of a cache."""
    counts = dict(ln.split(": ") for ln in git("count-objects", "-v", cwd=cache).splitlines())
    unreachable = git("fsck", "--unreachable", "--no-reflogs", cwd=cache).splitlines()
    return int(counts["count"]), len(unreachable)


def test_cache_is_compacted_after_a_force_push(remote: Remote, fetcher: GitFetcher) -> None:
    base = remote.commit({"a.yaml": "x: 0\n"})
    fetcher.fetch("ns/f", str(remote.bare), None)
    for i in range(3):
        remote.commit({f"blob{i}.txt": os.urandom(2000).hex()})
        fetcher.fetch("ns/f", str(remote.bare), None)
    git("reset", "-q", "--hard", base, cwd=remote.work)
    remote.commit({"a.yaml": "x: 1\n"}, force=True)
    assert fetcher.fetch("ns/f", str(remote.bare), None).rewritten
    assert _garbage(fetcher.cache_path("ns/f", str(remote.bare))) == (0, 0)


def test_cache_is_compacted_past_the_loose_object_threshold(remote: Remote, tmp_path: Path) -> None:
    fetcher = GitFetcher(tmp_path / "cache", gc_loose_objects=10)
    remote.commit({"a.yaml": "x\n"})
    fetcher.fetch("ns/f", str(remote.bare), None)
    cache = fetcher.cache_path("ns/f", str(remote.bare))
    remote.commit({f"f{i}.txt": f"{i}\n" for i in range(4)})  # 4 blobs, a tree, a commit
    fetcher.fetch("ns/f", str(remote.bare), None)
    assert _garbage(cache)[0] == 9  # (3 from the first fetch) below the threshold: left alone
    remote.commit({f"g{i}.txt": f"{i}\n" for i in range(4)})
    fetcher.fetch("ns/f", str(remote.bare), None)
    assert _garbage(cache)[0] == 0
    assert fetcher.manifest_files("ns/f", str(remote.bare), git("rev-parse", "HEAD", cwd=remote.work),
                                  ".") == {"a.yaml": b"x\n"}


def test_export_only_the_path_and_leaves_out_links_to_the_host(remote: Remote, fetcher: GitFetcher,
                                                               tmp_path: Path) -> None:
    remote.commit({"fleet/flake.nix": "{ }\n", "fleet/lib/a.nix": "1\n", "other/secret.txt": "s\n"})
    os.symlink("/nix/store/abc-result", remote.work / "result")  # a committed `nix build` link
    os.symlink("/var/run/secrets/token", remote.work / "fleet" / "token")
    os.symlink("../../../../etc/passwd", remote.work / "fleet" / "passwd")
    os.symlink("lib/a.nix", remote.work / "fleet" / "a.nix")  # stays inside: kept
    c = remote.commit({}, "links")
    url = str(remote.bare)
    fetcher.fetch("ns/f", url, None)
    out = tmp_path / "out"
    skipped = fetcher.export("ns/f", url, c, out, "fleet")
    assert sorted(skipped) == ["fleet/passwd", "fleet/token"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "fleet", "fleet/a.nix", "fleet/flake.nix", "fleet/lib", "fleet/lib/a.nix"]
    assert (out / "fleet" / "a.nix").read_text() == "1\n"
    assert sorted(fetcher.export("ns/f", url, c, tmp_path / "all")) == [
        "fleet/passwd", "fleet/token", "result"]  # the whole tree
    with pytest.raises(PathNotFound, match="'nope' does not exist"):
        fetcher.export("ns/f", url, c, tmp_path / "x", "nope")


@pytest.mark.parametrize(("stderr", "auth"), [
    ("fatal: unable to access 'https://git.example/r.git/': The requested URL returned error: 403",
     True),
    ("fatal: unable to access 'https://git.example/r.git/': The requested URL returned error: 401",
     True),
    # A number in a path is not an HTTP status (this failed once when pytest's temporary
    # directory happened to be /tmp/pytest-of-root/pytest-403).
    ("fatal: '/tmp/pytest-403/gone.git' does not appear to be a git repository\n"
     "fatal: Could not read from remote repository.", False),
])
def test_only_an_http_401_or_403_reads_as_an_authentication_failure(stderr: str, auth: bool) -> None:
    exc = GitCommandError(["git", "fetch"], 128, stderr=stderr)
    out = fetch_mod._classify(exc, "https://git.example/r.git", GitRef(branch="main"), [])
    assert (out.reason == "AuthenticationFailed") is auth
    assert out.transient is not auth
