"""Every kind of bad policy file is refused with its file, line and column (1-based), the place,
what was expected and what was found; all problems of all files come back together."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies import PolicyProblem, PolicyValidationError, load_policy_set
from tests.policies.conftest import write

SITE = "zz_site.yaml"


def _problems(policy_dir: Path, text: str, name: str = SITE) -> list[PolicyProblem]:
    write(policy_dir / name, text)
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(policy_dir)
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "field", "expected", "found", "line", "column"),
    [
        # unknown field: points at its name
        ("tenants:\n  acme:\n    rate_limit_rpm: 5\n    colour: blue\n", "tenants.acme.colour",
         "only known fields", "unknown field 'colour' = 'blue'", 4, 5),
        # unknown class
        ("tenants:\n  acme:\n    sla_class: platinum\n", "tenants.acme.sla_class",
         "one of ['batch', 'interactive', 'standard']", "'platinum'", 3, 16),
        # wrong types
        ("tenants:\n  acme:\n    rate_limit_rpm: many\n", "tenants.acme.rate_limit_rpm",
         "a valid integer", "'many'", 3, 21),
        ("tenants:\n  acme:\n    allowed_models: SmolLM2\n", "tenants.acme.allowed_models",
         "a valid list", "'SmolLM2'", 3, 21),
        ("tenants:\n  acme: [1, 2]\n", "tenants.acme", "a mapping", "[1, 2]", 2, 3),
        ("tenants: []\n", "tenants", "a mapping of name to definition", "list", 1, 1),
        # a field a tenant left out and its template lacks is reported at the tenant
        ("tenants:\n  acme:\n    residency: {regions: [eu], sites: ['*']}\n", "tenants.acme.residency.classifications",
         "a value (required field)", "nothing", 3, 5),
        # an unknown residency rule
        ("tenants:\n  acme:\n    residency: mars\n", "tenants.acme.residency", "a residency rule in ['anywhere']",
         "'mars'", 3, 16),
        # an unknown section
        ("retention_days: 5\n", "retention_days", "a section in", "an unknown section", 1, 1),
        # duplicate keys: the second one, naming the first
        ("tenants:\n  acme:\n    rate_limit_rpm: 1\n    rate_limit_rpm: 2\n", "tenants.acme.rate_limit_rpm",
         "each key once in a mapping (first defined at line 3, column 5)", "a second 'rate_limit_rpm'", 4, 5),
        # YAML that does not parse
        ("tenants:\n  acme: {rate_limit_rpm: 1\n", "line 3, column 1", "valid YAML",
         "expected ',' or '}', but got '<stream end>'", 3, 1),
        ("\ttenants: {}\n", "line 1, column 1", "valid YAML", "found character '\\t' that cannot start any token",
         1, 1),
    ],
)
def test_each_kind_of_problem_is_located(policy_dir: Path, text: str, field: str, expected: str, found: str,
                                         line: int, column: int) -> None:
    problems = {p.field: p for p in _problems(policy_dir, text)}
    assert field in problems, problems
    problem = problems[field]
    assert problem.file.endswith(SITE)
    assert expected in problem.expected, problem
    assert problem.found == found
    assert (problem.line, problem.column) == (line, column)
    assert problem.located().startswith(f"{problem.file}:{line}:{column}: {field}: expected ")


def test_a_tenant_mapped_to_a_class_that_is_missing(policy_dir: Path) -> None:
    # the template names a class no file defines: the template and the tenants inheriting it are refused
    write(policy_dir / "sla_classes.yaml", "sla_classes:\n  interactive: {priority: 0, ttft_ms: 10, deadline_ms: 20}\n")
    problems = {(p.file.rsplit("/", 1)[-1], p.field): p for p in _problems(
        policy_dir, "tenants:\n  acme:\n    rate_limit_rpm: 3\n  beta:\n    sla_class: gold\n")}
    template = problems[("tenants.yaml", "default_tenant.sla_class")]
    assert (template.expected, template.found) == ("one of ['interactive']", "'standard'")
    text = (policy_dir / "tenants.yaml").read_text().splitlines()
    assert template.line is not None and template.column is not None
    assert text[template.line - 1][template.column - 1:].startswith("standard")  # the value itself
    beta = problems[(SITE, "tenants.beta.sla_class")]
    assert (beta.line, beta.column, beta.found) == (5, 16, "'gold'")


def test_problems_of_several_files_come_back_together_each_with_its_own_position(policy_dir: Path) -> None:
    write(policy_dir / "aa.yaml", "sla_classes:\n  gold:\n    priority: 0\n    ttft_ms: 100\n    deadline_ms: 50\n")
    problems = _problems(policy_dir, "tenants:\n  acme:\n    sla_class: gold\n    max_tokens_per_request: 0\n")
    by_file = {(Path(p.file).name, p.field): (p.line, p.column) for p in problems}
    assert by_file[("aa.yaml", "sla_classes.gold")] == (2, 3)
    assert by_file[(SITE, "tenants.acme.max_tokens_per_request")] == (4, 29)
    # the class is defined (if invalid): the tenant mapped to it is not reported a second time
    assert (SITE, "tenants.acme.sla_class") not in by_file


def test_a_problem_in_no_single_file_has_no_position(tmp_path: Path) -> None:
    write(tmp_path / "only.yaml", "tenants: {}\n")
    with pytest.raises(PolicyValidationError) as info:
        load_policy_set(tmp_path)
    missing = [p for p in info.value.problems if p.field == "retention"]
    assert missing and missing[0].line is None and missing[0].located().startswith(f"{tmp_path}: retention:")
