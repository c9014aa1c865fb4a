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
