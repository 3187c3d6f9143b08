"""The JSON Schema of a policy file: exported from the typed documents, kept in docs/ in sync,
and agreeing with the loader on what a file may hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from policies import default_policy_dir
from policies.schema import policy_file_schema, policy_schema_json

DOCS = Path(__file__).resolve().parents[2] / "docs" / "policy.schema.json"


def _validator() -> jsonschema.Draft202012Validator:
    schema = policy_file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_docs_hold_the_schema_the_models_export() -> None:
    assert DOCS.read_text() == policy_schema_json(), (
        "docs/policy.schema.json is out of date: run `appliance policy schema > docs/policy.schema.json`")


def test_the_cli_prints_the_same_schema() -> None:
    run = subprocess.run([str(Path(sys.executable).parent / "appliance"), "policy", "schema"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == policy_file_schema()


def test_the_shipped_files_are_valid() -> None:
    validator = _validator()
    for path in default_policy_dir().glob("*.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path


GOOD_CLASS = {"priority": 0, "ttft_ms": 300, "tpot_ms": 50, "percentile": 99, "on_overload": "queue",
              "deadline_ms": 30000}


@pytest.mark.parametrize(
    ("doc", "valid"),
    [
        ({"sla_classes": {"live": GOOD_CLASS}}, True),
        ({"sla_classes": {"old": {"priority": 1, "ttft_target_ms": 5, "deadline_ms": 9}}}, True),  # old name
        ({"sla_classes": {"both": {"priority": 1, "ttft_target_ms": 5, "ttft_ms": 5, "deadline_ms": 9}}}, False),
        ({"sla_classes": {"none": {"priority": 1, "deadline_ms": 9}}}, False),
        ({"sla_classes": {"live": {**GOOD_CLASS, "percentile": 0}}}, False),
        ({"sla_classes": {"live": {**GOOD_CLASS, "percentile": 100.5}}}, False),
        ({"sla_classes": {"live": {**GOOD_CLASS, "tpot_ms": 0}}}, False),
        ({"sla_classes": {"live": {**GOOD_CLASS, "on_overload": "drop"}}}, False),
        ({"sla_classes": {"live": {**GOOD_CLASS, "colour": "red"}}}, False),
        ({"tenants": {"acme": {"sla_class": "live", "residency": "eu-only"}}}, True),  # fields inherited
        ({"tenants": {"acme": {"residency": {"regions": ["eu"], "sites": ["*"], "classifications": ["*"]}}}}, True),
        ({"tenants": {"acme": {"rate_limit_rpm": "ten"}}}, False),
        ({"tenants": {"bad name!": {}}}, False),
        ({"default_tenant": {"allowed_models": [], "residency": "anywhere", "sla_class": "standard"}}, False),
        ({"retention": {"audit_days": 30, "tenants": {"acme": {"store_content": True}}}}, True),
        ({"retention_days": 30}, False),
    ],
)
def test_the_schema_accepts_and_refuses_each_field(doc: dict[str, Any], valid: bool) -> None:
    errors = list(_validator().iter_errors(doc))
    assert (not errors) == valid, [e.message for e in errors]
