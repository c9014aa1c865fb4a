"""`hyperfleet controller|agent|job|get|start|...`: a mistyped flag, file or KUBECONFIG is a usage error (exit
2) whose message names the flag or variable, never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyperfleet.operator.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"
runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Not in a pod; KUBECONFIG and the root log handlers restored afterwards (the commands
    set both)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("HYPERFLEET_WEBHOOK_SECRET", raising=False)
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _usage_error(argv: list[str], env: dict[str, str] | None = None) -> str:
    r = runner.invoke(app, argv, env=env)
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    return r.output


COMMANDS = {
    "controller": ["controller", "--no-gitops"],
    "agent": ["agent", "--node-name", "n1"],
    "job submit": ["job", "submit", str(EXAMPLES / "resize.yaml")],
    "job status": ["job", "status", "resize-web"],
    "job list": ["job", "list"],
    "get": ["get", "vms"],
    "start": ["start", "web"],
    "restart": ["restart", "web"],
    "reconcile": ["reconcile", "gitsource", "fleet"],
}


def _bad_kubeconfigs(tmp_path: Path) -> dict[str, Path]:
    bad_yaml = tmp_path / "bad-yaml"
    bad_yaml.write_text("clusters: [a\n  token: s3cr3t-token-value\n")
    not_a_config = tmp_path / "not-a-config"
    not_a_config.write_text("hello\n")
    empty = tmp_path / "empty"
    empty.write_text("")
    return {"missing": tmp_path / "missing", "directory": tmp_path, "bad-yaml": bad_yaml,
            "not-a-config": not_a_config, "empty": empty}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_kubeconfig_is_a_usage_error_naming_the_variable(command: str, tmp_path: Path) -> None:
    for kind, path in _bad_kubeconfigs(tmp_path).items():
        out = _usage_error(COMMANDS[command], env={"KUBECONFIG": str(path)})
        assert "KUBECONFIG" in out and str(path) in out, (kind, out)
        assert "s3cr3t-token-value" not in out  # PyYAML would quote the offending line


def test_the_kubeconfig_flag_is_named_too(tmp_path: Path) -> None:
    out = _usage_error(["agent", "--node-name", "n1", "--kubeconfig", str(tmp_path / "nope")])
    assert "--kubeconfig" in out and str(tmp_path / "nope") in out


def test_no_kubeconfig_at_all_says_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.config import kube_config

    # The client fixes its default path when first imported: point it into an empty home.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / ".kube/config"))
    out = _usage_error(["job", "list"], env={"KUBECONFIG": ""})
    assert "KUBECONFIG" in out and "~/.kube/config" in out


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_an_unusable_webhook_secret_file_is_a_usage_error(content: str | None, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    out = _usage_error(["controller", "--webhook-port", "8080", "--webhook-secret-file", str(path)])
    assert f"--webhook-secret-file {path}" in out
    assert ("No such file" in out) if content is None else ("empty" in out)


def test_a_webhook_secret_directory_is_a_usage_error(tmp_path: Path) -> None:
    out = _usage_error(["controller", "--webhook-secret-file", str(tmp_path)])
    assert f"--webhook-secret-file {tmp_path}" in out


@pytest.mark.parametrize("command", ["controller", "agent"])
def test_log_format_accepts_only_json_or_text(command: str) -> None:
    out = _usage_error([*COMMANDS[command], "--log-format", "xml"])
    assert "--log-format" in out and "xml" in out
