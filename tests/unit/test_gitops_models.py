"""GitSource spec/status models and the CRD generated from them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hyperfleet.reconcilers.crdgen import build_crd
from hyperfleet.reconcilers.gitops.crd import GIT_SOURCE
from hyperfleet.reconcilers.models.gitsource import GitRef, GitSource, GitSourceSpec, parse_duration


def test_defaults() -> None:
    spec = GitSourceSpec.model_validate({"url": "https://github.com/acme/fleet"})
    assert spec.path == "." and spec.interval_seconds == 60 and spec.prune and not spec.suspend
    assert spec.max_deletion_ratio == 0.5 and spec.ref is None and spec.timeout_seconds == 60


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("1m", 60), ("1h30m", 5400),
                                                ("500ms", 0.5), ("1.5m", 90)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration() -> None:
    with pytest.raises(ValueError, match="like 30s"):
        parse_duration("soon")
    with pytest.raises(ValidationError, match="interval"):
        GitSourceSpec.model_validate({"url": "/r", "interval": "5 minutes"})


@pytest.mark.parametrize("url", ["https://h/o/r.git", "http://h/r", "ssh://git@h/r", "git@h:o/r.git",
                                 "file:///srv/r.git", "/srv/r.git", "https://user@h/r"])
def test_accepted_urls(url: str) -> None:
    assert GitSourceSpec.model_validate({"url": url}).url == url


def test_rejected_urls() -> None:
    with pytest.raises(ValidationError, match="must not contain a password or token"):
        GitSourceSpec.model_validate({"url": "https://bob:ghp_x@h/r"})
    with pytest.raises(ValidationError, match="use https://"):
        GitSourceSpec.model_validate({"url": "ftp://h/r"})


def test_path_normalised_and_confined() -> None:
    assert GitSourceSpec.model_validate({"url": "/r", "path": "./clusters/prod/"}).path == "clusters/prod"
    assert GitSourceSpec.model_validate({"url": "/r", "path": "/"}).path == "."
    with pytest.raises(ValidationError, match="inside the repository"):
        GitSourceSpec.model_validate({"url": "/r", "path": "../etc"})


def test_ref_one_of() -> None:
    assert GitRef(branch="main").describe() == "branch main"
    with pytest.raises(ValidationError, match="at most one"):
        GitRef.model_validate({"branch": "main", "tag": "v1"})
    with pytest.raises(ValidationError, match="commit"):
        GitRef.model_validate({"commit": "abc"})


def test_camel_case_on_the_wire() -> None:
    spec = GitSourceSpec.model_validate({"url": "/r", "secretRef": {"name": "git"},
                                         "targetNamespace": "prod", "maxDeletionRatio": 0.2})
    wire = spec.wire()
    assert wire["secretRef"] == {"name": "git"} and wire["targetNamespace"] == "prod"
    assert wire["maxDeletionRatio"] == 0.2
    with pytest.raises(ValidationError, match=r"maxDeletionRatio|max_deletion_ratio"):
        GitSourceSpec.model_validate({"url": "/r", "maxDeletionRatio": 2})
    with pytest.raises(ValidationError, match="Extra inputs"):
        GitSourceSpec.model_validate({"url": "/r", "branch": "main"})


def test_object_model() -> None:
    gs = GitSource.from_body({"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "GitSource",
                              "metadata": {"name": "fleet", "namespace": "ops"}, "spec": {"url": "/r"},
                              "status": {"lastAppliedCommit": "a" * 40, "somethingNew": 1}})
    assert gs.key == "ops/fleet" and gs.status.last_applied_commit == "a" * 40


def test_crd_shape() -> None:
    crd = build_crd(GIT_SOURCE)
    assert crd["metadata"]["name"] == "gitsources.hyperfleet.dev"
    assert crd["spec"]["names"]["shortNames"] == ["gs"] and crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["url"]
    assert spec["properties"]["maxDeletionRatio"] == {
        **spec["properties"]["maxDeletionRatio"], "type": "number", "default": 0.5, "maximum": 1.0}
    assert "x-kubernetes-validations" in spec["properties"]["ref"]
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"URL", "Commit", "Ready"}
