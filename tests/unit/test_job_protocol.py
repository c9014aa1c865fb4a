"""VmJob protocol: envelope validation, payload registry, builder, manifests."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hyperfleet.reconcilers.jobs.builder import JobBuilder, submit, to_manifest
from hyperfleet.reconcilers.jobs.envelope import (
    API_VERSION,
    KIND,
    PROTOCOL_VERSION,
    JobDocument,
    parse_version,
)
from hyperfleet.reconcilers.jobs.idempotency import request_fingerprint
from hyperfleet.reconcilers.jobs.parse import JobValidationError, from_manifest, parse_job, payload_spec
from hyperfleet.reconcilers.jobs.payloads import (
    GuestExecV1,
    PayloadData,
    VmResizeV1,
    quantity_to_bytes,
)
from hyperfleet.reconcilers.jobs.registry import REGISTRY, register_payload
from hyperfleet.reconcilers.jobs.routing import effective_capabilities

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
JOB_ID = "01HZY8R6J5Q4W3E2R1T0Y9V8J7"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def doc(**overrides: Any) -> dict[str, Any]:
    """A minimal valid spec (vm.reboot on web-1) with top-level overrides."""
    base: dict[str, Any] = {
        "version": "1.0",
        "operation": "vm.reboot",
        "payload": {"type": "vm.reboot.v1", "data": {}},
        "routing": {"targetVm": {"name": "web-1"}},
    }
    base.update(overrides)
    return base


def errors_of(obj: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(JobValidationError) as info:
        parse_job(obj)
    return dict(info.value.errors)


def only_error(obj: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(JobValidationError) as info:
        parse_job(obj)
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]


# --------------------------------------------------------------------------- envelope basics


def test_minimal_document_gets_defaults() -> None:
    job = parse_job(doc())
    assert job.version == "1.0"
    assert job.job_id is None
    assert job.execution.max_attempts == 3
    assert job.execution.timeout_seconds == 300
    assert job.execution.priority == 5
    assert job.execution.deadline is None
    assert job.execution.backoff.initial_seconds == 1
    assert job.execution.backoff.max_seconds == 60
    assert job.execution.backoff.multiplier == 2
    assert job.execution.backoff.jitter is True
    assert job.constraints.required_capabilities == []
    assert job.labels == {} and job.annotations == {}
    assert job.payload.data == {"mode": "soft"}  # normalised through the typed model


def test_snake_case_input_is_accepted() -> None:
    job = parse_job(
        doc(job_id=JOB_ID, execution={"max_attempts": 7, "timeout_seconds": 9}),
    )
    assert job.job_id == JOB_ID
    assert job.execution.max_attempts == 7
    assert job.to_spec()["execution"]["timeoutSeconds"] == 9


def test_spec_serialises_camel_case_and_omits_none() -> None:
    spec = parse_job(doc(execution={"idempotencyKey": "k"})).to_spec()
    assert spec["execution"]["idempotencyKey"] == "k"
    assert "deadline" not in spec["execution"]
    assert "jobId" not in spec
    assert spec["routing"] == {"targetVm": {"name": "web-1"}}


def test_non_mapping_input_is_rejected() -> None:
    with pytest.raises(JobValidationError) as info:
        parse_job(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert info.value.errors == [("", "a VmJob spec must be a mapping, got list")]
    assert str(info.value) == "(document): a VmJob spec must be a mapping, got list"


def test_all_errors_are_reported_together_and_str_is_one_line_each() -> None:
    with pytest.raises(JobValidationError) as info:
        parse_job(doc(version="2.0", jobId="short", execution={"priority": 11}))
    err = info.value
    assert err.paths == ["version", "jobId", "execution.priority"]
    assert str(err).splitlines()[0] == (
        'version: unsupported protocol version "2.0"; supported: 1.x (set version: "1.0")'
    )
    assert len(str(err).splitlines()) == 3


# --------------------------------------------------------------------------- version


def test_version_unsupported_major() -> None:
    path, message = only_error(doc(version="2.0"))
    assert path == "version"
    assert message.startswith('unsupported protocol version "2.0"; supported: 1.x')


def test_version_bad_format() -> None:
    assert only_error(doc(version="1")) == (
        "version",
        '"1" is not a protocol version; use "MAJOR.MINOR", e.g. "1.0"',
    )


def test_version_number_from_unquoted_yaml() -> None:
    assert only_error(doc(version=1.0)) == (
        "version",
        "must be a string, got float 1.0; quote it in YAML",
    )


def test_version_missing_names_example() -> None:
    obj = doc()
    del obj["version"]
    assert only_error(obj) == ("version", 'required field is missing; add version: "1.0"')


def test_newer_minor_version_is_accepted() -> None:
    assert parse_job(doc(version="1.7")).version == "1.7"
    assert parse_version("1.7") == (1, 7)
    with pytest.raises(ValueError):
        parse_version("one")


# --------------------------------------------------------------------------- jobId


def test_job_id_short() -> None:
    path, message = only_error(doc(jobId="short"))
    assert path == "jobId"
    assert "not a ULID" in message and "got 5" in message and "omit jobId" in message


def test_job_id_invalid_character() -> None:
    path, _ = only_error(doc(jobId="01HZY8R6J5Q4W3E2R1T0Y9U8IL"))  # I, L, U not in Crockford
    assert path == "jobId"


def test_job_id_lowercase_is_normalised() -> None:
    assert parse_job(doc(jobId=JOB_ID.lower())).job_id == JOB_ID


# --------------------------------------------------------------------------- operation


def test_operation_must_be_namespaced() -> None:
    assert only_error(doc(operation="snapshot")) == (
        "operation",
        '"snapshot" is not namespaced; use "<namespace>.<name>", e.g. "vm.snapshot"',
    )


def test_operation_must_be_lowercase() -> None:
    path, message = only_error(doc(operation="VM.Reboot"))
    assert path == "operation"
    assert "lowercase" in message


def test_unknown_operation_lists_known_ones() -> None:
    path, message = only_error(doc(operation="acme.flush", payload={"type": "acme.flush.v1"}))
    assert path == "operation"
    assert message.startswith('unknown operation "acme.flush"; known operations: guest.exec,')
    assert "vm.snapshot" in message


# --------------------------------------------------------------------------- payload envelope


def test_payload_type_must_match_operation() -> None:
    path, message = only_error(doc(payload={"type": "vm.snapshot.v1"}))
    assert path == "payload.type"
    assert message.startswith('payload type "vm.snapshot.v1" does not match operation "vm.reboot"')
    assert "vm.reboot.v1" in message


def test_unknown_payload_version_lists_known_types() -> None:
    assert only_error(doc(payload={"type": "vm.reboot.v9"})) == (
        "payload.type",
        'unknown payload type "vm.reboot.v9"; known types for vm.reboot: vm.reboot.v1',
    )


def test_payload_missing() -> None:
    obj = doc()
    del obj["payload"]
    path, message = only_error(obj)
    assert path == "payload"
    assert "vm.snapshot.v1" in message  # the example shows the shape


def test_payload_errors_reported_with_envelope_errors() -> None:
    errors = errors_of(
        doc(
            execution={"priority": -1},
            operation="vm.resize",
            payload={"type": "vm.resize.v1", "data": {"desiredCpus": 0}},
        )
    )
    assert set(errors) == {"execution.priority", "payload.data.desiredCpus"}


# --------------------------------------------------------------------------- typed payloads


def resize(data: dict[str, Any]) -> dict[str, Any]:
    return doc(operation="vm.resize", payload={"type": "vm.resize.v1", "data": data})


def test_resize_field_error_names_path() -> None:
    assert only_error(resize({"desiredCpus": 0})) == (
        "payload.data.desiredCpus",
        "must be at least 1 (got 0); use a larger value",
    )


def test_resize_requires_cpus_or_memory() -> None:
    assert only_error(resize({})) == (
        "payload.data",
        "nothing to resize; set desiredCpus and/or desiredMemory",
    )


def test_resize_memory_quantity() -> None:
    path, message = only_error(resize({"desiredMemory": "2Gx"}))
    assert path == "payload.data.desiredMemory"
    assert '"2Gx" is not a memory quantity' in message
    job = parse_job(resize({"desiredMemory": 2147483648}))
    typed = job.typed_payload()
    assert isinstance(typed, VmResizeV1)
    assert typed.desired_memory == "2147483648"
    assert typed.desired_memory_bytes == 2 * 2**30


def test_resize_memory_zero_rejected() -> None:
    path, message = only_error(resize({"desiredMemory": "0Gi"}))
    assert path == "payload.data.desiredMemory"
    assert "greater than zero" in message


def test_snapshot_defaults_and_destination() -> None:
    def snap(data: dict[str, Any]) -> dict[str, Any]:
        return doc(operation="vm.snapshot", payload={"type": "vm.snapshot.v1", "data": data})

    assert parse_job(snap({})).payload.data == {"pauseVm": True}
    ok = parse_job(snap({"destination": "s3://bucket/web-1", "pauseVm": False}))
    assert ok.payload.data == {"destination": "s3://bucket/web-1", "pauseVm": False}
    path, message = only_error(snap({"destination": "relative/dir"}))
    assert path == "payload.data.destination"
    assert "neither an absolute path nor a URL" in message


def test_restore_requires_source() -> None:
    obj = doc(operation="vm.restore", payload={"type": "vm.restore.v1", "data": {}})
    assert only_error(obj) == (
        "payload.data.source",
        'required field is missing; add source: "/var/lib/hyperfleet/snapshots/web-1"',
    )
    obj["payload"]["data"] = {"source": "/snap/web-1"}
    assert parse_job(obj).payload.data == {"source": "/snap/web-1", "resume": True}


def test_reboot_mode_literal() -> None:
    path, message = only_error(doc(payload={"type": "vm.reboot.v1", "data": {"mode": "warm"}}))
    assert path == "payload.data.mode"
    assert "'soft'" in message and "'hard'" in message and '"warm"' in message


def test_migrate_destination_node() -> None:
    def migrate(data: dict[str, Any]) -> dict[str, Any]:
        return doc(operation="vm.migrate", payload={"type": "vm.migrate.v1", "data": data})

    path, _ = only_error(migrate({}))
    assert path == "payload.data.destinationNode"
    path, message = only_error(migrate({"destinationNode": "Node_B"}))
    assert path == "payload.data.destinationNode"
    assert "not a valid node name" in message
    assert parse_job(migrate({"destinationNode": "node-b"})).payload.data == {"destinationNode": "node-b"}


def exec_doc(data: dict[str, Any], **execution: Any) -> dict[str, Any]:
    return doc(
        operation="guest.exec",
        payload={"type": "guest.exec.v1", "data": data},
        execution=execution,
    )


def test_exec_command_non_empty() -> None:
    assert only_error(exec_doc({"command": []})) == (
        "payload.data.command",
        "must contain at least 1 item(s); add one",
    )


def test_exec_program_not_blank() -> None:
    path, message = only_error(exec_doc({"command": ["  ", "x"]}))
    assert path == "payload.data.command"
    assert "command[0]" in message


def test_exec_command_item_type_path() -> None:
    path, _ = only_error(exec_doc({"command": ["ls", 3]}))
    assert path == "payload.data.command[1]"


def test_exec_timeout_must_fit_job_timeout() -> None:
    path, message = only_error(exec_doc({"command": ["ls"], "timeoutSeconds": 600}))
    assert path == "payload.data.timeoutSeconds"
    assert "600s exceeds execution.timeoutSeconds (300s)" in message
    job = parse_job(exec_doc({"command": ["ls"], "timeoutSeconds": 600}, timeoutSeconds=900))
    typed = job.typed_payload()
    assert isinstance(typed, GuestExecV1) and typed.timeout_seconds == 600


def test_health_check_default_and_empty_name() -> None:
    def hc(data: dict[str, Any]) -> dict[str, Any]:
        obj = doc(operation="system.health-check")
        obj["payload"] = {"type": "system.health-check.v1", "data": data}
        del obj["routing"]
        return obj

    assert parse_job(hc({})).payload.data == {"checks": []}
    path, message = only_error(hc({"checks": ["disk", ""]}))
    assert path == "payload.data.checks"
    assert "checks[1] is empty" in message


# --------------------------------------------------------------------------- execution


@pytest.mark.parametrize(
    ("execution", "path", "fragment"),
    [
        ({"idempotencyKey": ""}, "execution.idempotencyKey", "must not be empty"),
        ({"idempotencyKey": "k" * 254}, "execution.idempotencyKey", "at most 253 characters"),
        ({"maxAttempts": 0}, "execution.maxAttempts", "must be at least 1 (got 0)"),
        ({"maxAttempts": 101}, "execution.maxAttempts", "must be at most 100 (got 101)"),
        ({"timeoutSeconds": 0}, "execution.timeoutSeconds", "must be at least 1 (got 0)"),
        ({"priority": 11}, "execution.priority", "must be at most 10 (got 11)"),
        ({"priority": -1}, "execution.priority", "must be at least 0 (got -1)"),
        ({"priority": "high"}, "execution.priority", 'must be a whole number (got "high")'),
        ({"deadline": "tomorrow"}, "execution.deadline", "must be an RFC3339 timestamp"),
        ({"deadline": "2030-01-01T00:00:00"}, "execution.deadline", "must carry a UTC offset"),
        (
            {"backoff": {"initialSeconds": 0}},
            "execution.backoff.initialSeconds",
            "must be greater than 0",
        ),
        ({"backoff": {"multiplier": 0.5}}, "execution.backoff.multiplier", "must be at least 1"),
        ({"backoff": {"jitter": "sometimes"}}, "execution.backoff.jitter", "true or false"),
        (
            {"backoff": {"initialSeconds": 10, "maxSeconds": 5}},
            "execution.backoff.maxSeconds",
            "must be >= initialSeconds (10), got 5",
        ),
        ({"backoff": {"maxSeconds": 1e12}}, "execution.backoff.maxSeconds", "must be at most 86400"),
        (
            {"backoff": {"initialSeconds": 86401, "maxSeconds": 86400}},
            "execution.backoff.initialSeconds",
            "must be at most 86400 (got 86401)",
        ),
    ],
)
def test_execution_rules(execution: dict[str, Any], path: str, fragment: str) -> None:
    got_path, message = only_error(doc(execution=execution))
    assert got_path == path
    assert fragment in message


def test_deadline_must_be_after_submission() -> None:
    obj = doc(
        execution={"deadline": "2030-01-01T00:00:00Z"},
        audit={"submittedAt": "2030-01-01T01:00:00Z"},
    )
    path, message = only_error(obj)
    assert path == "execution.deadline"
    assert "not after audit.submittedAt" in message


def test_deadline_accepts_offsets() -> None:
    job = parse_job(doc(execution={"deadline": "2030-01-01T02:00:00+02:00"}))
    assert job.execution.deadline == datetime(2030, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- constraints, routing


def test_capability_name_rule() -> None:
    path, message = only_error(doc(constraints={"requiredCapabilities": ["snapshot", "Hot_Resize"]}))
    assert path == "constraints.requiredCapabilities[1]"
    assert '"Hot_Resize" is not a capability name' in message


def test_capability_duplicates_rejected() -> None:
    path, message = only_error(doc(constraints={"requiredCapabilities": ["vsock", "vsock"]}))
    assert path == "constraints.requiredCapabilities"
    assert 'duplicate capability "vsock"' in message


def test_target_vm_required_for_vm_operations() -> None:
    obj = doc()
    del obj["routing"]
    assert only_error(obj) == (
        "routing.targetVm",
        "required for operation vm.reboot; set routing.targetVm.name to the VM to act on",
    )


def test_target_vm_required_for_guest_exec() -> None:
    obj = exec_doc({"command": ["ls"]})
    del obj["routing"]
    path, _ = only_error(obj)
    assert path == "routing.targetVm"


def test_target_vm_name_and_namespace_rules() -> None:
    assert only_error(doc(routing={"targetVm": {}})) == (
        "routing.targetVm.name",
        'required field is missing; add name: "web-1"',
    )
    path, message = only_error(doc(routing={"targetVm": {"name": "Web_1"}}))
    assert path == "routing.targetVm.name" and "not a valid VM name" in message
    path, message = only_error(doc(routing={"targetVm": {"name": "w", "namespace": "a.b"}}))
    assert path == "routing.targetVm.namespace" and "not a valid namespace" in message


def test_worker_pool_and_affinity_names() -> None:
    path, _ = only_error(doc(routing={"targetVm": {"name": "w"}, "workerPool": "GPU"}))
    assert path == "routing.workerPool"
    path, message = only_error(
        doc(routing={"targetVm": {"name": "w"}, "affinity": {"preferNodeNames": ["ok", "No"]}})
    )
    assert path == "routing.affinity.preferNodeNames[1]"
    assert "not a valid node name" in message


# --------------------------------------------------------------------------- observability, misc


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("traceId", TRACE.upper()),
        ("traceId", "0" * 32),
        ("traceId", TRACE[:-1]),
        ("spanId", "abc"),
        ("spanId", "0" * 16),
    ],
)
def test_trace_context_ids(field: str, value: str) -> None:
    path, message = only_error(doc(observability={field: value}))
    assert path == f"observability.{field}"
    assert "omit it to have one generated" in message


def test_labels_must_be_strings() -> None:
    path, message = only_error(doc(labels={"team": 7}))
    assert path == "labels.team"
    assert "must be a string" in message


def test_audit_submitted_at_parsed() -> None:
    job = parse_job(doc(audit={"submittedBy": "alice", "submittedAt": "2030-01-01T12:00:00Z"}))
    assert job.audit.submitted_at == NOW
    assert job.audit.submitted_by == "alice"


# --------------------------------------------------------------------------- forward compatibility


def test_unknown_fields_survive_round_trip() -> None:
    obj = doc(
        futureTopLevel={"nested": [1, 2]},
        execution={"maxAttempts": 4, "futureExec": "x"},
        routing={"targetVm": {"name": "web-1", "zone": "eu-1"}},
        observability={"baggage": "k=v"},
    )
    obj["payload"]["data"] = {"mode": "hard", "graceSeconds": 5}
    first = parse_job(copy.deepcopy(obj)).to_spec()
    assert first["futureTopLevel"] == {"nested": [1, 2]}
    assert first["execution"]["futureExec"] == "x"
    assert first["execution"]["maxAttempts"] == 4
    assert first["routing"]["targetVm"]["zone"] == "eu-1"
    assert first["observability"]["baggage"] == "k=v"
    assert first["payload"]["data"] == {"mode": "hard", "graceSeconds": 5}
    assert parse_job(first).to_spec() == first


def test_model_validate_enforces_semantic_rules_too() -> None:
    with pytest.raises(ValidationError) as info:
        JobDocument.model_validate(resize({}))
    assert "payload.data: nothing to resize" in str(info.value)
    job = JobDocument.model_validate(resize({"desiredCpus": 2}))
    assert job.payload.data == {"desiredCpus": 2}


# --------------------------------------------------------------------------- registry


class FlushV1(PayloadData):
    volume: str


def test_register_payload_function_form_on_isolated_registry() -> None:
    registry = REGISTRY.copy()
    returned = register_payload(
        "acme.flush.v1", FlushV1, required_capabilities={"acme-fs"}, registry=registry
    )
    assert returned is FlushV1
    spec = registry.get("acme.flush.v1")
    assert spec is not None
    assert (spec.operation, spec.version, spec.targets_vm) == ("acme.flush", 1, False)
    obj = doc(operation="acme.flush", payload={"type": "acme.flush.v1", "data": {"volume": "v"}})
    del obj["routing"]
    job = parse_job(obj, registry)
    assert effective_capabilities(job, registry) == {"acme-fs"}
    assert "acme.flush.v1" not in REGISTRY  # the global registry is untouched
    with pytest.raises(JobValidationError):
        parse_job(obj)


def test_register_payload_decorator_and_versions() -> None:
    registry = REGISTRY.copy()

    @register_payload("vm.flush.v2", registry=registry, required_capabilities=["flush"])
    class FlushV2(PayloadData):
        volume: str

    @register_payload("vm.flush.v1", registry=registry)
    class FlushOld(PayloadData):
        pass

    assert registry.types_for("vm.flush") == ["vm.flush.v1", "vm.flush.v2"]
    latest = registry.latest("vm.flush")
    assert latest is not None and latest.model is FlushV2
    assert latest.targets_vm is True and latest.requires_running_vm is True
    job = JobBuilder("vm.flush", registry=registry).payload(volume="v").target("w").build(now=NOW)
    assert job.payload.type == "vm.flush.v2"
    assert FlushOld.__name__ == "FlushOld"


def test_register_payload_rejects_bad_input() -> None:
    registry = REGISTRY.copy()
    with pytest.raises(ValueError, match="already registered"):
        register_payload("vm.reboot.v1", FlushV1, registry=registry)
    spec = registry.register("vm.reboot.v1", FlushV1, replace=True)
    assert spec.model is FlushV1
    with pytest.raises(ValueError, match="must look like"):
        registry.register("flush-v1", FlushV1)
    with pytest.raises(ValueError, match="must look like"):
        registry.register("acme.flush", FlushV1)
    with pytest.raises(TypeError, match="PayloadData"):
        registry.register("acme.flush.v1", dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a DNS label"):
        registry.register("acme.flush.v1", FlushV1, required_capabilities={"Bad_Cap"})
    registry.unregister("vm.reboot.v1")
    assert "vm.reboot.v1" not in registry


def test_builtin_registry_contents() -> None:
    assert [s.type_name for s in REGISTRY] == [
        "guest.exec.v1",
        "system.health-check.v1",
        "vm.migrate.v1",
        "vm.reboot.v1",
        "vm.resize.v1",
        "vm.restore.v1",
        "vm.snapshot.v1",
    ]
    caps = {s.type_name: set(s.required_capabilities) for s in REGISTRY}
    assert caps["vm.snapshot.v1"] == {"snapshot"}
    assert caps["vm.resize.v1"] == {"hot-resize"}
    assert caps["vm.migrate.v1"] == {"migration"}
    assert caps["guest.exec.v1"] == {"vsock"}
    assert caps["system.health-check.v1"] == set()
    restore = REGISTRY.get("vm.restore.v1")
    assert restore is not None and restore.requires_running_vm is False


def test_effective_capabilities_merges_constraints() -> None:
    job = parse_job(
        doc(
            operation="vm.snapshot",
            payload={"type": "vm.snapshot.v1"},
            constraints={"requiredCapabilities": ["provision", "snapshot"]},
        )
    )
    assert effective_capabilities(job) == {"snapshot", "provision"}
    assert payload_spec(job).type_name == "vm.snapshot.v1"


# --------------------------------------------------------------------------- builder


def test_builder_full_example() -> None:
    job = (
        JobBuilder("vm.resize")
        .payload(desired_cpus=4)
        .target("web-1", namespace="default")
        .priority(8)
        .idempotency_key("k")
        .require("hot-resize", "provision", "hot-resize")
        .timeout(60)
        .max_attempts(5)
        .backoff(initial=2, maximum=30, multiplier=3, jitter=False)
        .deadline(NOW + timedelta(hours=1))
        .worker_pool("general")
        .affinity(["node-a", "node-b"], prefer=["node-b"])
        .trace(trace_id=TRACE, span_id=SPAN, correlation_id="req-1")
        .submitted_by("alice", reason="traffic spike")
        .label("team", "web")
        .annotate("ticket", "OPS-1")
        .build(now=NOW, rng=random.Random(7))
    )
    assert job.operation == "vm.resize"
    assert job.payload.type == "vm.resize.v1"
    assert job.payload.data == {"desiredCpus": 4}
    assert job.routing.target_vm is not None
    assert (job.routing.target_vm.name, job.routing.target_vm.namespace) == ("web-1", "default")
    assert job.execution.priority == 8
    assert job.execution.idempotency_key == "k"
    assert job.execution.timeout_seconds == 60
    assert job.execution.max_attempts == 5
    assert job.execution.backoff.model_dump() == {
        "initial_seconds": 2,
        "max_seconds": 30,
        "multiplier": 3,
        "jitter": False,
    }
    assert job.execution.deadline == NOW + timedelta(hours=1)
    assert job.constraints.required_capabilities == ["hot-resize", "provision"]
    assert job.routing.worker_pool == "general"
    assert job.routing.affinity is not None
    assert job.routing.affinity.node_names == ["node-a", "node-b"]
    assert job.routing.affinity.prefer_node_names == ["node-b"]
    assert job.observability.trace_id == TRACE
    assert job.observability.span_id == SPAN
    assert job.observability.correlation_id == "req-1"
    assert (job.audit.submitted_by, job.audit.reason) == ("alice", "traffic spike")
    assert job.audit.submitted_at == NOW
    assert job.labels == {"team": "web"} and job.annotations == {"ticket": "OPS-1"}
    assert job.job_id is not None and len(job.job_id) == 26


def test_builder_generates_ids_deterministically_with_rng() -> None:
    def make() -> JobDocument:
        return JobBuilder("vm.reboot").target("w").build(now=NOW, rng=random.Random(1))

    a, b = make(), make()
    assert a.job_id == b.job_id
    assert a.observability.trace_id == b.observability.trace_id
    assert a.job_id is not None and a.observability.trace_id is not None
    assert a.observability.span_id is not None
    assert len(a.observability.trace_id) == 32 and len(a.observability.span_id) == 16
    # The ULID carries the submission time.
    from ulid import ULID

    assert ULID.from_str(a.job_id).datetime == NOW
    c = JobBuilder("vm.reboot").target("w").build(now=NOW)
    assert c.job_id != a.job_id


def test_builder_keeps_explicit_job_id() -> None:
    job = JobBuilder("vm.reboot").target("w").job_id(JOB_ID).build(now=NOW)
    assert job.job_id == JOB_ID


def test_builder_rejects_unknown_payload_field() -> None:
    with pytest.raises(JobValidationError) as info:
        JobBuilder("vm.resize").payload(desired_cpu=4)
    assert info.value.errors == [
        (
            "payload.data.desired_cpu",
            "unknown field for vm.resize.v1; known fields: desiredCpus, desiredMemory",
        )
    ]


def test_builder_payload_data_passes_raw_fields() -> None:
    job = JobBuilder("vm.reboot").payload_data({"mode": "hard", "graceSeconds": 3}).target("w").build(now=NOW)
    assert job.payload.data == {"mode": "hard", "graceSeconds": 3}


def test_builder_accepts_camel_case_payload_kwargs() -> None:
    job = JobBuilder("vm.snapshot").payload(pauseVm=False).target("w").build(now=NOW)
    assert job.payload.data == {"pauseVm": False}


def test_builder_build_validates() -> None:
    with pytest.raises(JobValidationError) as info:
        JobBuilder("vm.resize").payload(desired_cpus=2).priority(11).build(now=NOW)
    assert info.value.paths == ["execution.priority"]
    with pytest.raises(JobValidationError) as info:
        JobBuilder("vm.resize").payload(desired_cpus=2).build(now=NOW)
    assert info.value.paths == ["routing.targetVm"]


def test_builder_rejects_deadline_in_the_past() -> None:
    builder = JobBuilder("vm.reboot").target("w").deadline(NOW - timedelta(seconds=1))
    with pytest.raises(JobValidationError) as info:
        builder.build(now=NOW)
    assert info.value.paths == ["execution.deadline"]


def test_builder_payload_type_and_protocol_version_overrides() -> None:
    with pytest.raises(JobValidationError) as info:
        JobBuilder("vm.reboot").payload_type("vm.reboot.v2").target("w").build(now=NOW)
    assert info.value.paths == ["payload.type"]
    with pytest.raises(JobValidationError) as info:
        JobBuilder("vm.reboot").protocol_version("3.1").target("w").build(now=NOW)
    assert info.value.paths == ["version"]


def test_builder_to_mapping_is_wire_form() -> None:
    mapping = JobBuilder("vm.reboot").payload(mode="hard").target("w").priority(2).to_mapping()
    assert mapping == {
        "version": PROTOCOL_VERSION,
        "operation": "vm.reboot",
        "payload": {"type": "vm.reboot.v1", "data": {"mode": "hard"}},
        "execution": {"priority": 2},
        "routing": {"targetVm": {"name": "w"}},
    }


# --------------------------------------------------------------------------- submit, manifests


def test_submit_fills_missing_and_keeps_present() -> None:
    job = parse_job(doc(observability={"traceId": TRACE}))
    stamped = submit(job, now=NOW, rng=random.Random(3))
    assert job.job_id is None  # original untouched
    assert stamped.job_id is not None
    assert stamped.observability.trace_id == TRACE
    assert stamped.observability.span_id is not None
    assert stamped.audit.submitted_at == NOW
    again = submit(stamped, now=NOW + timedelta(hours=1))
    assert again.to_spec() == stamped.to_spec()
    with pytest.raises(ValueError, match="timezone-aware"):
        submit(job, now=datetime(2030, 1, 1))


def test_to_manifest_and_back() -> None:
    job = JobBuilder("vm.reboot").target("w").job_id(JOB_ID).build(now=NOW)
    manifest = to_manifest(job)
    assert manifest["apiVersion"] == API_VERSION == "hyperfleet.dev/v1alpha1"
    assert manifest["kind"] == KIND == "VmJob"
    assert manifest["metadata"] == {
        "name": JOB_ID.lower(),
        "namespace": "default",
        "labels": {
            "hyperfleet.dev/operation": "vm.reboot",
            "hyperfleet.dev/job-id": JOB_ID.lower(),
        },
    }
    assert manifest["spec"] == job.to_spec()
    assert from_manifest(manifest).to_spec() == job.to_spec()
    named = to_manifest(job, name="reboot-w", namespace="prod")
    assert named["metadata"]["name"] == "reboot-w"
    assert named["metadata"]["namespace"] == "prod"


def test_to_manifest_needs_a_name() -> None:
    with pytest.raises(ValueError, match="no jobId"):
        to_manifest(parse_job(doc()))
    assert to_manifest(parse_job(doc()), name="x")["metadata"]["name"] == "x"


def test_from_manifest_prefixes_spec_paths() -> None:
    manifest = {"apiVersion": API_VERSION, "kind": "VmJob", "spec": doc(version="2.0")}
    with pytest.raises(JobValidationError) as info:
        from_manifest(manifest)
    assert info.value.paths == ["spec.version"]
    with pytest.raises(JobValidationError) as info:
        from_manifest({"apiVersion": "v1", "kind": "Pod", "spec": doc()})
    assert info.value.paths == ["apiVersion", "kind"]


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("2Gi", 2 * 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9), ("1e3", 1000), ("0.5Ki", 512),
     ("1.5", 2), ("1.5Gi", 1536 * 2**20)],
)
def test_quantity_to_bytes(quantity: str, expected: int) -> None:
    assert quantity_to_bytes(quantity) == expected


@pytest.mark.parametrize("quantity", ["2GB", "-1Gi", "1e3Mi", "Gi", ""])
def test_quantity_to_bytes_rejects(quantity: str) -> None:
    with pytest.raises(ValueError):
        quantity_to_bytes(quantity)


def test_request_fingerprint_tracks_what_the_job_does() -> None:
    a = parse_job(doc(labels={"x": "1"}))
    b = parse_job(doc(labels={"x": "2"}, execution={"priority": 9}))
    c = parse_job(doc(payload={"type": "vm.reboot.v1", "data": {"mode": "hard"}}))
    d = parse_job(doc(routing={"targetVm": {"name": "web-2"}}))
    assert request_fingerprint(a) == request_fingerprint(b)
    assert request_fingerprint(a) != request_fingerprint(c)
    assert request_fingerprint(a) != request_fingerprint(d)


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    priority=st.integers(0, 10),
    attempts=st.integers(1, 100),
    timeout=st.integers(1, 10**6),
    cpus=st.integers(1, 512),
    labels=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3),
    extra=st.dictionaries(
        st.from_regex(r"x[A-Za-z]{1,8}", fullmatch=True), st.integers() | st.text(), max_size=3
    ),
)
def test_property_round_trip_is_lossless(
    priority: int,
    attempts: int,
    timeout: int,
    cpus: int,
    labels: dict[str, str],
    extra: dict[str, Any],
) -> None:
    obj = resize({"desiredCpus": cpus})
    obj["execution"] = {"priority": priority, "maxAttempts": attempts, "timeoutSeconds": timeout}
    obj["labels"] = labels
    obj.update(extra)
    spec = parse_job(obj).to_spec()
    assert parse_job(spec).to_spec() == spec
    assert spec["execution"]["priority"] == priority
    assert spec["labels"] == labels
    for key, value in extra.items():
        assert spec[key] == value


def test_json_schema_is_crd_friendly() -> None:
    schema = JobDocument.model_json_schema(by_alias=True)
    defs = schema["$defs"]
    assert schema["properties"]["version"]["pattern"] == r"^([0-9]+)\.([0-9]+)$"
    assert schema["properties"]["jobId"]["pattern"].startswith("^[0-7]")
    # OpenAPI v3.0 (CRDs) wants a boolean exclusiveMinimum next to minimum.
    initial = defs["Backoff"]["properties"]["initialSeconds"]
    assert (initial["minimum"], initial["exclusiveMinimum"]) == (0, True)
    items = defs["Constraints"]["properties"]["requiredCapabilities"]["items"]
    assert items["pattern"] == r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    # Unknown fields are allowed everywhere (rendered as preserve-unknown-fields by crdgen).
    assert schema["additionalProperties"] is True
    assert all(d.get("additionalProperties") is True for d in defs.values() if "properties" in d)


@pytest.mark.parametrize("document", [[{"kind": "VmJob"}], "VmJob", 3])
def test_from_manifest_rejects_a_document_that_is_not_a_mapping(document: Any) -> None:
    with pytest.raises(JobValidationError) as info:
        from_manifest(document)
    ((path, message),) = info.value.errors
    assert path == "" and type(document).__name__ in message and "mapping" in message
