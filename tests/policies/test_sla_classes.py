"""SLA classes: TTFT and TPOT targets at a percentile, overload action, deadline; the old field
name still loads; impossible targets are refused with the place, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import PolicyValidationError, SLAClass, load_policy_set
from tests.policies.conftest import write


def _classes(policy_dir: Path, body: str) -> dict[str, SLAClass]:
    write(policy_dir / "sla_classes.yaml", "sla_classes:\n" + body)
    return load_policy_set(policy_dir).sla_classes


def _problems(policy_dir: Path, body: str) -> dict[str, tuple[str, str, int | None, int | None]]:
    write(policy_dir / "sla_classes.yaml", "sla_classes:\n" + body)
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(policy_dir)
    return {p.field: (p.expected, p.found, p.line, p.column) for p in info.value.problems}


STANDARD = "  standard: {priority: 1, ttft_ms: 500, deadline_ms: 60000}\n"


def test_new_fields_and_their_defaults(policy_dir: Path) -> None:
    classes = _classes(policy_dir, STANDARD + (
        "  live:\n    priority: 0\n    ttft_ms: 300\n    tpot_ms: 50\n    percentile: 99.9\n"
        "    on_overload: queue\n    deadline_ms: 30000\n"))
    live = classes["live"]
    assert (live.ttft_ms, live.tpot_ms, live.percentile, live.on_overload, live.deadline_ms) == (
        300, 50, 99.9, "queue", 30000)
    standard = classes["standard"]
    assert (standard.tpot_ms, standard.percentile, standard.on_overload) == (None, 99.0, "shed")
    assert standard.ttft_target_ms == standard.ttft_ms == 500  # the old attribute still reads


def test_the_old_name_ttft_target_ms_still_loads(policy_dir: Path) -> None:
    classes = _classes(policy_dir, "  standard: {priority: 1, ttft_target_ms: 700, deadline_ms: 9000}\n")
    assert classes["standard"].ttft_ms == 700
    found = _problems(policy_dir, "  standard: {priority: 1, ttft_target_ms: 700, ttft_ms: 600, deadline_ms: 9000}\n")
    expected, what, line, column = found["sla_classes.standard.ttft_target_ms"]
    assert expected == "ttft_ms or its old name ttft_target_ms, not both"
    assert "ttft_ms=600" in what and (line, column) == (2, 43)  # at the value of the old name


def test_shipped_classes_have_targets_within_their_deadlines() -> None:
    for sla in load_policy_set().sla_classes.values():
        assert sla.ttft_ms <= sla.deadline_ms
        assert sla.tpot_ms is None or sla.ttft_ms + sla.tpot_ms <= sla.deadline_ms
        assert 0 < sla.percentile <= 100 and sla.on_overload in ("shed", "queue")


@pytest.mark.parametrize(
    ("body", "field", "expected", "found", "line", "column"),
    [
        ("  standard: {priority: 1, ttft_ms: 900, deadline_ms: 500}\n", "sla_classes.standard",
         "ttft_ms <= deadline_ms (500)", "ttft_ms=900", 2, 3),
        ("  standard:\n    priority: 1\n    ttft_ms: 400\n    tpot_ms: 200\n    deadline_ms: 500\n",
         "sla_classes.standard", "ttft_ms + tpot_ms <= deadline_ms (500", "ttft_ms + tpot_ms=600", 2, 3),
        ("  standard:\n    priority: 1\n    ttft_ms: 400\n    tpot_ms: 0\n    deadline_ms: 500\n",
         "sla_classes.standard.tpot_ms", "greater than or equal to 1", "0", 5, 14),
        ("  standard:\n    priority: 1\n    ttft_ms: 400\n    percentile: 0\n    deadline_ms: 500\n",
         "sla_classes.standard.percentile", "greater than 0", "0", 5, 17),
        ("  standard:\n    priority: 1\n    ttft_ms: 400\n    percentile: 100.5\n    deadline_ms: 500\n",
         "sla_classes.standard.percentile", "less than or equal to 100", "100.5", 5, 17),
        ("  standard:\n    priority: 1\n    ttft_ms: 400\n    percentile: '99'\n    deadline_ms: 500\n",
         "sla_classes.standard.percentile", "a valid number", "'99'", 5, 17),
        ("  standard:\n    priority: 1\n    ttft_ms: 400\n    on_overload: drop\n    deadline_ms: 500\n",
         "sla_classes.standard.on_overload", "'shed' or 'queue'", "'drop'", 5, 18),
        ("  standard:\n    priority: 1001\n    ttft_ms: 400\n    deadline_ms: 500\n",
         "sla_classes.standard.priority", "less than or equal to 1000", "1001", 3, 15),
        ("  standard:\n    priority: 1\n    deadline_ms: 500\n",
         "sla_classes.standard.ttft_ms", "a value (required field)", "nothing", 2, 3),
        ("  standard:\n    priority: 1\n    ttft_ms: 10\n    deadline_ms: 500\n    max_wait_ms: 5\n",
         "sla_classes.standard.max_wait_ms", "only known fields", "unknown field 'max_wait_ms' = 5", 6, 5),
    ],
)
def test_impossible_or_malformed_classes_are_refused_with_their_place(
        policy_dir: Path, body: str, field: str, expected: str, found: str, line: int, column: int) -> None:
    problems = _problems(policy_dir, body)
    assert field in problems, problems
    got_expected, got_found, got_line, got_column = problems[field]
    assert expected in got_expected and got_found == found
    assert (got_line, got_column) == (line, column)
