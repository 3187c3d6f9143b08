"""The JSON Schema of one policy file, exported from the typed documents.

Each section's entries are the pydantic documents' own schemas (``documents.py``), adjusted to
what a file holds: an entry's ``name`` is its key (optional in the body, equal to the key when
given); a listed tenant may leave out any field (inherited from ``default_tenant``); a tenant's
``residency`` is a rule's name or an inline rule; an SLA class may spell ``ttft_ms`` by its old
name ``ttft_target_ms`` (one of the two is required). Checks the schema cannot express (duplicate
keys, a tenant's class or rule existing, sections spread over files, cross-field rules such as
``ttft_ms <= deadline_ms``) are the loader's: ``appliance policy validate`` runs both.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import TypeAdapter

from policies.documents import NAME_PATTERN, ResidencyRule, RetentionPolicy, SLAClass, TenantPolicy

SCHEMA_ID = "https://sovereign.invalid/schemas/policy.schema.json"  # an identifier, never fetched


def _document(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(TypeAdapter(cls).json_schema(ref_template="#/$defs/{model}"))
    defs.update(schema.pop("$defs", {}))
    return schema


def _name_optional(schema: dict[str, Any]) -> dict[str, Any]:
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    if "name" in schema.get("properties", {}):
        schema["properties"]["name"]["description"] = "Equal to the entry's key when given."
    return schema


def _sla_class(defs: dict[str, Any]) -> dict[str, Any]:
    schema = _name_optional(_document(SLAClass, defs))
    props = schema["properties"]
    props["ttft_target_ms"] = {**props["ttft_ms"], "title": "Ttft Target Ms", "deprecated": True,
                               "description": "The old name of ttft_ms (give one of the two)."}
    schema["required"] = [r for r in schema["required"] if r != "ttft_ms"]
    schema["oneOf"] = [{"required": ["ttft_ms"]}, {"required": ["ttft_target_ms"]}]
    return schema


def _tenant(defs: dict[str, Any], *, template: bool) -> dict[str, Any]:
    schema = _name_optional(_document(TenantPolicy, defs))
    schema["properties"]["residency"] = {
        "anyOf": [{"type": "string", "pattern": NAME_PATTERN, "description": "A rule's name under residency."},
                  {"$ref": "#/$defs/ResidencyRule"}]}
    if not template:  # a listed tenant inherits whatever it leaves out from default_tenant
        schema["required"] = []
    return schema


def policy_file_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one policy YAML file."""
    defs: dict[str, Any] = {}
    sla = _sla_class(defs)
    residency = _name_optional(_document(ResidencyRule, defs))
    tenant, template = _tenant(defs, template=False), _tenant(defs, template=True)
    retention = _document(RetentionPolicy, defs)

    def named(entry: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "propertyNames": {"pattern": NAME_PATTERN}, "additionalProperties": entry}

    defs.update({"SLAClassEntry": sla, "ResidencyRuleEntry": residency, "TenantEntry": tenant,
                 "DefaultTenant": template, "Retention": retention})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Sovereign appliance policy file",
        "description": "One policy YAML file. A policy set is one file or a directory of them; sections may be "
                       "spread over files, but default_tenant and retention appear exactly once in the set.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "sla_classes": named({"$ref": "#/$defs/SLAClassEntry"}),
            "residency": named({"$ref": "#/$defs/ResidencyRuleEntry"}),
            "default_tenant": {"$ref": "#/$defs/DefaultTenant"},
            "tenants": named({"$ref": "#/$defs/TenantEntry"}),
            "retention": {"$ref": "#/$defs/Retention"},
        },
        "$defs": defs,
    }


def policy_schema_json() -> str:
    """The schema as the text written to docs/policy.schema.json (stable key order, newline at end)."""
    return json.dumps(policy_file_schema(), indent=2, sort_keys=True) + "\n"
