"""`hyperfleet job`: a typo in a value or a file is reported against what the user typed,
never as a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyperfleet.operator.cli import app

runner = CliRunner()


@pytest.mark.parametrize(("key", "value"), [("command", "[/bin/sh, -c"),
                                            ("desiredMemory", ": 2Gi")])
def test_create_reports_a_set_value_that_is_not_yaml(key: str, value: str) -> None:
    r = runner.invoke(app, ["job", "create", "guest.exec", "--target", "web",
                            "--set", f"{key}={value}"])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert f"--set {key}:" in r.output and "not a valid YAML value" in r.output
    assert value in r.output


def test_validate_names_a_document_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text("- apiVersion: hyperfleet.dev/v1alpha1\n  kind: VmJob\n")
    r = runner.invoke(app, ["job", "validate", str(path)])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert f"{path} document 1" in r.output and "got a list" in r.output
