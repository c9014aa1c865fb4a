"""`hyperfleet job create|validate`: documents that validate, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from hyperfleet.operator.cli import app
from hyperfleet.reconcilers.jobs.parse import from_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"
runner = CliRunner()


def test_create_prints_a_valid_manifest() -> None:
    r = runner.invoke(app, ["job", "create", "vm.resize", "--target", "web", "--set",
                            "desiredCpus=4", "--priority", "9", "--require", "hot-resize",
                            "-n", "prod"])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    job = from_manifest(doc)
    assert doc["metadata"]["namespace"] == "prod"
    assert job.payload.data["desiredCpus"] == 4
    assert job.execution.priority == 9
    assert job.constraints.required_capabilities == ["hot-resize"]
    assert len(job.job_id or "") == 26


def test_create_names_the_bad_field() -> None:
    r = runner.invoke(app, ["job", "create", "vm.resize", "--target", "web", "--set",
                            "desiredCpus=0"])
    assert r.exit_code == 2
    assert "payload.data.desiredCpus" in r.output


def test_create_rejects_a_set_without_value() -> None:
    r = runner.invoke(app, ["job", "create", "vm.reboot", "--target", "w", "--set", "mode"])
    assert r.exit_code == 2 and "key=value" in r.output


def test_validate_examples_and_a_broken_file(tmp_path: Path) -> None:
    for example in sorted(EXAMPLES.glob("*.yaml")):
        r = runner.invoke(app, ["job", "validate", str(example)])
        assert r.exit_code == 0, (example, r.output)
    bad = yaml.safe_load((EXAMPLES / "resize.yaml").read_text())
    bad["spec"]["version"] = "2.0"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = runner.invoke(app, ["job", "validate", str(path)])
    assert r.exit_code == 2
    assert "spec.version" in r.output and "2.0" in r.output
    path.write_text("a: [")
    r = runner.invoke(app, ["job", "validate", str(path)])
    assert r.exit_code == 2 and "not valid YAML" in r.output
