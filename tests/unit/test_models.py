"""Model rules that the CRD schema mirrors, and quantity handling."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hyperfleet.reconcilers.models.common import format_quantity, parse_quantity, set_condition
from hyperfleet.reconcilers.models.vm import VirtualMachineSpec


@pytest.mark.parametrize(
    ("text", "n"), [("512Mi", 512 << 20), ("2Gi", 2 << 30), ("1000", 1000), ("1k", 1000)]
)
def test_parse_quantity(text: str, n: int) -> None:
    assert parse_quantity(text) == n


def test_bad_quantity_names_the_fix() -> None:
    with pytest.raises(ValueError, match="Ki/Mi/Gi"):
        parse_quantity("lots")


@pytest.mark.parametrize(("text", "n"), [
    ("1.5Gi", 1536 << 20), ("0.5Gi", 512 << 20), (".5Gi", 512 << 20), ("1.Gi", 1 << 30),
    ("1e3", 1000), ("1E3", 1000), ("2e+3", 2000), ("1000e-3", 1), ("1.5k", 1500),
    ("1P", 10**15), ("1Ei", 2**60), ("0", 0),
    ("1.5", 2), ("0.1Ki", 103)])  # a fraction of a byte rounds up, as Quantity.Value()
def test_quantities_follow_kubernetes_rules(text: str, n: int) -> None:
    assert parse_quantity(text) == n


@pytest.mark.parametrize(("text", "why"), [
    ("1e3Mi", "not a memory quantity"),  # Kubernetes: an exponent or a suffix, not both
    ("1.5GB", "not a memory quantity"), ("-1Gi", "not a memory quantity"),
    ("500m", "not a memory quantity"), ("1K", "not a memory quantity"), ("Gi", "not a memory"),
    ("nan", "not a memory quantity"), ("1e999999999", "larger than Kubernetes allows"),
])
def test_bad_quantities_name_the_field_and_the_fix(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_quantity(text, "spec.memory")
    assert str(info.value).startswith("spec.memory: ")
    assert "1.5Gi" in str(info.value) or "2^63" in str(info.value)


def test_one_parser_for_vms_and_jobs() -> None:
    from hyperfleet.reconcilers.jobs import payloads
    from hyperfleet.reconcilers.models import common

    assert payloads.QUANTITY_PATTERN == common.QUANTITY_PATTERN
    assert payloads.quantity_to_bytes("1.5Gi") == parse_quantity("1.5Gi")


def test_vm_memory_takes_decimals_but_not_zero() -> None:
    base = {"cpus": 1, "boot": {"kernel": "/k"}}
    spec = VirtualMachineSpec.model_validate({**base, "memory": "1.5Gi", "maxMemory": "2Gi"})
    assert spec.memory_bytes == 1536 << 20 and spec.max_memory_bytes == 2 << 30
    for bad, why in (("0", "is zero"), ("0.0Gi", "is zero"), ("1GB", "should match pattern")):
        with pytest.raises(ValidationError, match=why):
            VirtualMachineSpec.model_validate({**base, "memory": bad})


def test_format_quantity_round_trips() -> None:
    for q in ("512Mi", "2Gi", "3Ti", "1536Ki", "1000"):
        assert format_quantity(parse_quantity(q)) == q


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"cpus": 0}, "cpus"),
        ({"runStrategy": "Sometimes"}, "runStrategy"),
        ({"memory": "1GB"}, "memory"),
        ({"memory": "0"}, "memory"),
        ({"memory": "0Gi"}, "memory"),
        ({"maxMemory": "0"}, "maxMemory"),
        ({"boot": {"cmdline": "x"}}, "boot"),
        ({"maxCpus": 1, "cpus": 2}, "maxCpus"),
        ({"unknownField": 1}, "unknownField"),
    ],
)
def test_invalid_specs_name_the_field(patch: dict[str, object], field: str) -> None:
    base = {"cpus": 1, "memory": "1Gi", "boot": {"kernel": "/k"}}
    with pytest.raises(ValidationError) as exc:
        VirtualMachineSpec.model_validate({**base, **patch})
    assert field in str(exc.value)


def test_condition_keeps_transition_time_until_status_flips() -> None:
    conds = set_condition([], "Ready", False, "Starting")
    t0 = conds[0].last_transition_time
    same = set_condition(conds, "Ready", False, "StillStarting")
    assert same[0].last_transition_time == t0 and same[0].reason == "StillStarting"
    from datetime import timedelta
    assert t0 is not None
    flipped = set_condition(same, "Ready", True, "Up", now=t0 + timedelta(seconds=5))
    assert flipped[0].status == "True" and flipped[0].last_transition_time != t0
