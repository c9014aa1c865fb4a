"""Structured logs: one JSON object per line, extras kept, secrets never written."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfleet.operator import logs
from hyperfleet.operator.logs import JsonFormatter, RedactFilter, redact, setup

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"


def line(msg: str, **extra: object) -> dict[str, object]:
    record = logging.makeLogRecord({"msg": msg, "levelname": "INFO", "name": "t", **extra})
    out: dict[str, object] = json.loads(JsonFormatter().format(record))
    return out


def test_extras_become_fields() -> None:
    out = line("bound VM", vm="default/web-1", node="n1")
    assert out["msg"] == "bound VM" and out["vm"] == "default/web-1" and out["node"] == "n1"
    assert out["level"] == "info" and "ts" in out


def test_secrets_in_messages_and_fields_are_redacted() -> None:
    out = line(f"cloning https://bot:ghp_abcdef123456@git.example/repo with {KEY}",
               token="s3cr3t-value", headers={"Authorization": "Bearer abcdefghijkl"},
               url="https://user:pw123456@host/x")
    text = json.dumps(out)
    for secret in ("ghp_abcdef123456", "b3BlbnNzaC1rZXktdjEAAAAA", "s3cr3t-value",
                   "abcdefghijkl", "pw123456"):
        assert secret not in text
    assert out["token"] == "***"
    assert str(out["msg"]).startswith("cloning https://***@git.example/repo with ***")
    assert out["url"] == "https://***@host/x"
    assert out["headers"] == {"Authorization": "***"}


def test_redact_leaves_ordinary_text_alone() -> None:
    assert redact("VM web-1 booted on node-2") == "VM web-1 booted on node-2"


# ------------------------------------------------------------- forms a reviewer found unredacted

@pytest.mark.parametrize(("text", "secret", "shape"), [
    ("git fetch https://ghp_abcdefghijklmnop1234@github.com/org/fleet.git failed",
     "ghp_abcdefghijklmnop1234", "https://***@github.com/org/fleet.git"),
    ("ssh://git:hunter2@example.com/repo", "hunter2", "ssh://***@example.com/repo"),
    ("GET https://h/api?access_token=s3cr3tvalue123&x=1", "s3cr3tvalue123", "?access_token=***&x=1"),
    ("webhook url https://h/hook?token=s3cr3tvalue123", "s3cr3tvalue123", "?token=***"),
    ("signed https://h/o?key=s3cr3tvalue123&X-Amz-Signature=abcdef", "s3cr3tvalue123", "?key=***"),
    ("secret yaml:\npassword: hunter2hunter2\nname: web", "hunter2hunter2", "password: ***\nname: web"),
    ('{"token": "abcdefgh12345", "name": "web"}', "abcdefgh12345", '{"token": "***", "name": "web"}'),
    ("{'clientSecret': 'hunter2'}", "hunter2", "{'clientSecret': '***'}"),
    ("env GIT_PASSWORD=hunter2 X=1", "hunter2", "GIT_PASSWORD=*** X=1"),
    ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "Authorization: Basic ***"),
    ("argv: git --password hunter2 fetch", "hunter2", "--password *** fetch"),
    ("key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n(truncated",
     "b3BlbnNzaC1rZXktdjEAAAAA", "key:\n***"),
])
def test_common_secret_forms_are_redacted(text: str, secret: str, shape: str) -> None:
    out = redact(text)
    assert secret not in out and shape in out, out
    assert redact(out) == out  # idempotent: two handlers may both redact one record


def test_block_scalar_under_a_secret_key() -> None:
    """The indented lines of `password: |` are the secret, not the `|`."""
    assert redact("password: |\n  hunter2\n  more\nnext: ok") == "password: ***\nnext: ok"


@pytest.mark.parametrize("unit", ["a.", "-a", ".-a", "_a.", "--a", "a=b&", "x: y\n", "token "])
def test_redaction_time_is_linear_in_long_tokens(unit: str) -> None:
    """Each record passes through every pattern: one that restarts inside a long dotted or
    dashed token (a hostname list, a base64 blob) would stall logging for minutes."""
    started = time.perf_counter()
    redact(unit * 20000)
    assert time.perf_counter() - started < 1.0


def test_names_of_secrets_stay_readable() -> None:
    """A key that names or locates a secret helps debugging and reveals nothing."""
    for text in ("secretRef: fleet-git", "--webhook-secret-file /etc/hyperfleet/secret",
                 "token bucket refill", "git@github.com:org/fleet.git",
                 "webhook push ref=refs/heads/main after=abc123"):
        assert redact(text) == text
    assert line("x", secretRef="fleet-git")["secretRef"] == "fleet-git"


def test_extra_fields_are_walked_through_lists_and_camel_case_keys() -> None:
    out = line("apply", env=[{"name": "X", "value": "a"}, {"password": "hunter2"}],
               argv=["git", "--token", "abcdefgh12345", "--depth=1"], opts=("--password=pw123456",),
               apiKey="abcdefgh12345", accessToken="tok12345",
               kubeconfig="users: [{user: {client-key-data: AAAA}}]")
    assert "hunter2" not in json.dumps(out) and "abcdefgh12345" not in json.dumps(out)
    assert out["env"] == [{"name": "X", "value": "a"}, {"password": "***"}]
    assert out["argv"] == ["git", "--token", "***", "--depth=1"]
    assert out["opts"] == ["--password=***"]
    assert out["apiKey"] == out["accessToken"] == out["kubeconfig"] == "***"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup() replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _capture(fmt: str, level: str = "info") -> io.StringIO:
    setup(level=level, fmt=fmt)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    buf = io.StringIO()
    handler.setStream(buf)
    return buf


@pytest.mark.usefixtures("root_logging")
def test_text_format_is_redacted_too() -> None:
    buf = _capture("text")
    log = logging.getLogger("kopf.objects")  # any logger that propagates to the root
    log.warning("Authorization: Bearer abcdefghijklmnop and %s", "https://u:pw12345@h/x")
    try:
        raise RuntimeError("clone https://ghp_abcdefghijklmnop1234@github.com/o/r failed")
    except RuntimeError:
        log.exception("fetch failed with password=%s", "hunter2")
    text = buf.getvalue()
    for secret in ("abcdefghijklmnop", "pw12345", "ghp_abcdefghijklmnop1234", "hunter2"):
        assert secret not in text, text
    assert "Authorization: Bearer ***" in text and "https://***@h/x" in text
    assert "RuntimeError: clone https://***@github.com/o/r failed" in text


@pytest.mark.usefixtures("root_logging")
def test_json_handler_redacts_exceptions_and_survives_bad_arguments() -> None:
    buf = _capture("json")
    log = logging.getLogger("hyperfleet.test")
    try:
        raise ValueError("token=s3cr3tvalue")
    except ValueError:
        log.exception("failed", extra={"headers": {"Authorization": "Bearer abcdefghijkl"}})
    log.warning("%d VMs with password=hunter2", "not-a-number")  # must not raise or leak
    first, second = (json.loads(x) for x in buf.getvalue().splitlines())
    assert "s3cr3tvalue" not in first["exc"] and "token=***" in first["exc"]
    assert first["headers"] == {"Authorization": "***"}
    assert "hunter2" not in second["msg"] and "password=***" in second["msg"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.usefixtures("root_logging")
def test_handlers_on_library_loggers_are_redacted_too() -> None:
    """Like kopf's, which posts an object's warnings as Kubernetes Events."""
    import kopf  # noqa: F401 - its Event poster is a handler on the kopf.objects logger

    own = _Collect()
    lib = logging.getLogger("hyperfleet.test.library")
    lib.addHandler(own)
    try:
        _capture("json")
        lib.warning("clone https://bot:ghp_abcdef123456@git.example/repo failed")
        assert own.lines == ["clone https://***@git.example/repo failed"]
        assert all(any(isinstance(f, RedactFilter) for f in h.filters)
                   for h in logging.getLogger("kopf.objects").handlers)
    finally:
        lib.removeHandler(own)


@pytest.mark.usefixtures("root_logging")
def test_unknown_log_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="json, text"):
        setup(fmt="xml")


@pytest.mark.usefixtures("root_logging")
def test_text_format_keeps_the_structured_fields() -> None:
    buf = _capture("text")
    logging.getLogger("hyperfleet.t").warning(
        "converge failed", extra={"vm": "default/web", "attempt": 3, "error": "no such file",
                                  "token": "abcdefghijkl"})
    text = buf.getvalue()
    assert 'converge failed vm=default/web attempt=3 error="no such file" token=***' in text
    assert "abcdefghijkl" not in text


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_log_level_and_kopf_handler_noise(level: str) -> None:
    """kopf's "Handler ... succeeded" (INFO, on kopf.objects and kopf.activities) shows only at
    debug; its warnings and errors show whatever the level allows."""
    buf = _capture("text", level)
    for name in ("kopf.objects", "kopf.activities.startup"):
        kopf_log = logging.getLogger(name)
        kopf_log.info("Handler 'vm_event' succeeded.")
        kopf_log.warning("Handler 'vm_event' failed temporarily: boom")
        kopf_log.error("Handler 'vm_event' failed permanently: bang")
    logging.getLogger("hyperfleet.t").info("VM bound")
    text = buf.getvalue()
    assert ("succeeded" in text) == (level == "debug")
    assert ("VM bound" in text) == (level in ("debug", "info"))
    assert text.count("failed temporarily") == (2 if level != "error" else 0)
    assert text.count("failed permanently") == 2


@pytest.mark.usefixtures("root_logging")
def test_unknown_log_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        setup(level="verbose")


def test_entry_points_take_log_level() -> None:
    from typer.testing import CliRunner

    from hyperfleet.operator import gitsource
    from hyperfleet.operator.cli import app

    for cmd in ("controller", "agent"):
        r = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert "--log-level" in r.output and "debug" in r.output, r.output
    with pytest.raises(SystemExit):
        gitsource.main(["--log-level", "verbose"])


_WORDS = ["token", "password", "passwd", "passphrase", "secret", "apiKey", "api_key", "private-key",
          "client-key-data", "ssh_key", "sshKey", "accessKey", "signingKey", "cookie",
          "Authorization", "credential", "clientSecret", "key", "sig", "signature", "apikey"]
_SHAPES = ["{w}={v}", "{w}: {v}", '"{w}": "{v}"', "?{w}={v}", "&x_{w}={v}", "--{w} {v}",
           "-{w}={v}", "{w}: |\n  {v}\n", "{w} {v}", "https://{v}@host/{w}",
           "-----BEGIN {w} PRIVATE KEY-----\n{v}"]


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize("word", _WORDS)
def test_the_quick_screen_passes_every_secret_shape_to_the_patterns(shape: str, word: str) -> None:
    for value in ("hunter2hunter2", "Bearer abcdefgh12345678", "ghp_abcdefgh12345678"):
        text = shape.format(w=word, v=value)
        slow = text
        for pat, replacement in logs._PATTERNS:
            slow = pat.sub(replacement, slow)
        assert logs.redact(text) == slow, text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    "token", "Bearer ", "basic ", "password", "passphrase", "secret", "apiKey", "client-key-data",
    "ssh_key", "cookie", "Authorization", "credential", "sig", "://", "@", "=", ": ", "--",
    "-----BEGIN RSA PRIVATE KEY-----", "LS0tLS1CRUdJTiBQUklW", "https://", "?", "&", "|\n  ",
    "abcdefgh12345678", "vm-0001", "default/web", " ", "\n", '"', "'"]), max_size=12).map("".join))
def test_the_quick_screen_never_lets_through_what_the_patterns_would_hide(text: str) -> None:
    slow = text
    for pat, replacement in logs._PATTERNS:
        slow = pat.sub(replacement, slow)
    assert logs.redact(text) == slow
