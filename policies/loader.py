"""Loading policy YAML files into a validated PolicySet.

A policy path is one YAML file or a directory of ``*.yaml``/``*.yml`` files (not recursive),
read in name order. Each file is a mapping whose keys are sections:

- ``sla_classes``: name -> {priority, ttft_ms (old name ttft_target_ms), tpot_ms, percentile,
  on_overload, deadline_ms}
- ``residency``: name -> {regions, sites, classifications}  (named rules tenants refer to)
- ``default_tenant``: the template for tenants not listed (required, exactly once)
- ``tenants``: name -> tenant policy; fields left out are inherited from ``default_tenant``
- ``retention``: {audit_days, store_content, tenants} (required, exactly once; ``tenants`` maps a
  tenant name to its own ``audit_days`` and/or ``store_content``)

A tenant's ``residency`` is either the name of a rule under ``residency`` or an inline mapping.
Mapping sections may be spread over files; one name defined twice is an error, as is any
duplicate key inside a file. Every problem names the file, its line and column, the field,
what was expected and what was found; all problems are reported together.

``load_policy_files`` validates in-memory file contents (``appliance policy apply`` and the admin
API check a new set before anything is written); its digest equals the one the same bytes under
the same names give when loaded from disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from policies.documents import ResidencyRule, RetentionPolicy, SLAClass, TenantPolicy
from policies.errors import PolicyNotFoundError, PolicyProblem, PolicyValidationError
from policies.marks import Position, first_key, key_place, locate, node_marks
from policies.policy_set import DEFAULT_TENANT_NAME, PolicySet

SECTIONS = ("sla_classes", "residency", "default_tenant", "tenants", "retention")
_MAPPING_SECTIONS = ("sla_classes", "residency", "tenants")
_SINGLE_SECTIONS = ("default_tenant", "retention")
_MAX_FILE_BYTES = 1 << 20
MAX_FILE_BYTES = _MAX_FILE_BYTES  # one policy file's size limit

T = TypeVar("T")


def default_policy_dir() -> Path:
    """The directory of default policy files shipped inside the package."""
    return Path(str(resources.files("policies") / "defaults"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping  # type: ignore[arg-type]
)


def _policy_files(path: Path) -> list[Path]:
    if not path.exists():
        raise PolicyNotFoundError(f"policy path: expected a YAML file or a directory, found nothing at {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise PolicyNotFoundError(f"policy directory {path}: expected *.yaml files, found none")
    return files


def _found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problems_from(error: ValidationError, file: str, prefix: str) -> list[PolicyProblem]:
    problems = []
    for err in error.errors():
        loc = ".".join(str(part) for part in err["loc"])
        where = f"{prefix}.{loc}" if loc else prefix
        kind = err["type"]
        if kind == "missing":
            problems.append(PolicyProblem(file, where, "a value (required field)", "nothing"))
        elif kind in ("unexpected_keyword_argument", "extra_forbidden"):
            problems.append(PolicyProblem(file, where, "only known fields",
                                          f"unknown field {err['loc'][-1]!r} = {_found(err['input'])}"))
        elif kind == "too_short":
            ctx = err.get("ctx", {})
            problems.append(PolicyProblem(file, where, f"at least {ctx.get('min_length')} item(s)",
                                          f"{ctx.get('actual_length')} item(s)"))
        elif kind == "value_error":
            # our own validators phrase the message as "<expected>, found <found>"
            msg = str(err["msg"]).removeprefix("Value error, ")
            expected, _, found = msg.partition(", found ")
            problems.append(PolicyProblem(file, where, expected, found or _found(err["input"])))
        else:
            expected = str(err["msg"]).removeprefix("Input should be ")
            problems.append(PolicyProblem(file, where, expected, _found(err["input"])))
    return problems


def _yaml_problem(file: str, data: bytes, exc: yaml.YAMLError) -> PolicyProblem:
    """A parser's error as a problem; a duplicate key names its place and its first definition."""
    mark = getattr(exc, "problem_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    problem = str(getattr(exc, "problem", None) or exc)
    if line is not None and column is not None and problem.startswith("found duplicate key"):
        place = key_place(data, line, column)
        first = first_key(data, place) if place is not None else None
        if place is not None and first is not None:
            return PolicyProblem(file, place, f"each key once in a mapping (first defined at line {first[0]}, "
                                              f"column {first[1]})", f"a second {place.rsplit('.', 1)[-1]!r}",
                                 line, column)
    where = f"line {line}, column {column}" if line is not None else "<file>"
    return PolicyProblem(file, where, "valid YAML", problem, line, column)


class _Builder:
    """Collects sections from files, validates them and accumulates problems."""

    def __init__(self) -> None:
        self.problems: list[PolicyProblem] = []
        # section -> name -> (file, body); single sections use name ""
        self.entries: dict[str, dict[str, tuple[str, Any]]] = {s: {} for s in SECTIONS}
        # SLA class names defined anywhere (valid or not), so a bad class is reported once
        self._sla_names: set[str] = set()
        self._marks: dict[str, dict[str, Position]] = {}  # file -> place -> (line, column)

    def add_file(self, file: str, data: bytes) -> None:
        if len(data) > _MAX_FILE_BYTES:
            self.problems.append(PolicyProblem(file, "<file>", f"at most {_MAX_FILE_BYTES} bytes", f"{len(data)}"))
            return
        try:
            doc = yaml.load(data, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            self.problems.append(_yaml_problem(file, data, exc))
            return
        self._marks[file] = node_marks(data)
        if doc is None:
            return
        if not isinstance(doc, dict):
            self.problems.append(PolicyProblem(file, "<top level>", f"a mapping of sections {list(SECTIONS)}",
                                               type(doc).__name__, 1, 1))
            return
        for section, body in doc.items():
            self._add_section(file, section, body)

    def located(self) -> list[PolicyProblem]:
        """The problems, each with the line and column of its place in its file where known."""
        out = []
        for problem in self.problems:
            by_key = problem.expected in ("only known fields", "a second definition") or problem.found == (
                "an unknown section") or problem.expected.startswith("one definition")
            position = (locate(self._marks.get(problem.file, {}), problem.field, key=by_key)
                        if problem.line is None else None)
            if position is not None:
                problem = dataclasses.replace(problem, line=position[0], column=position[1])
            out.append(problem)
        return out

    def _add_section(self, file: str, section: Any, body: Any) -> None:
        if section not in SECTIONS:
            self.problems.append(PolicyProblem(file, str(section), f"a section in {list(SECTIONS)}",
                                               "an unknown section"))
            return
        if section in _SINGLE_SECTIONS:
            self._add_entry(file, section, "", body)
            return
        if not isinstance(body, dict):
            self.problems.append(PolicyProblem(file, section, "a mapping of name to definition",
                                               type(body).__name__))
            return
        for name, entry in body.items():
            self._add_entry(file, section, str(name), entry)

    def _add_entry(self, file: str, section: str, name: str, body: Any) -> None:
        where = f"{section}.{name}" if name else section
        if name in self.entries[section]:
            other = self.entries[section][name][0]
            self.problems.append(PolicyProblem(file, where, f"one definition (already defined in {other})",
                                               "a second definition"))
            return
        if not isinstance(body, dict):
            self.problems.append(PolicyProblem(file, where, "a mapping", _found(body)))
            return
        if section == "sla_classes" and "ttft_ms" in body and "ttft_target_ms" in body:
            self.problems.append(PolicyProblem(file, f"{where}.ttft_target_ms",
                                               "ttft_ms or its old name ttft_target_ms, not both",
                                               f"both (ttft_ms={_found(body['ttft_ms'])}, "
                                               f"ttft_target_ms={_found(body['ttft_target_ms'])})"))
            return
        self.entries[section][name] = (file, body)

    def validate(self, cls: type[T], file: str, where: str, body: dict[str, Any]) -> T | None:
        try:
            return TypeAdapter(cls).validate_python(body)
        except ValidationError as exc:
            self.problems.extend(_problems_from(exc, file, where))
            return None

    def named(self, cls: type[T], section: str) -> dict[str, T]:
        out: dict[str, T] = {}
        for name, (file, body) in self.entries[section].items():
            if "name" in body and body["name"] != name:
                self.problems.append(PolicyProblem(file, f"{section}.{name}.name", repr(name), _found(body["name"])))
                continue
            value = self.validate(cls, file, f"{section}.{name}", {**body, "name": name})
            if value is not None:
                out[name] = value
        return out

    def tenant(self, file: str, where: str, name: str, body: dict[str, Any],
               inherited: dict[str, Any], residency: dict[str, ResidencyRule]) -> TenantPolicy | None:
        merged = {**inherited, **body, "name": name}
        rule = merged.get("residency")
        if isinstance(rule, str):
            if rule not in residency:
                self.problems.append(PolicyProblem(file, f"{where}.residency",
                                                   f"a residency rule in {sorted(residency)}", repr(rule)))
                return None
            merged["residency"] = residency[rule]
        sla = merged.get("sla_class")
        if isinstance(sla, str) and sla not in self._sla_names:
            self.problems.append(PolicyProblem(file, f"{where}.sla_class",
                                               f"one of {sorted(self._sla_names)}", repr(sla)))
            merged.pop("sla_class")  # reported; let validation report the rest
            self.validate(TenantPolicy, file, where, {**merged, "sla_class": next(iter(self._sla_names), "x")})
            return None
        return self.validate(TenantPolicy, file, where, merged)

    def build(self, sources: list[str], digest: str, origin: str) -> PolicySet:
        sla_classes = self.named(SLAClass, "sla_classes")
        self._sla_names = set(self.entries["sla_classes"])
        if not self.entries["sla_classes"]:
            self.problems.append(PolicyProblem(origin, "sla_classes", "at least one SLA class", "none"))
        residency = self.named(ResidencyRule, "residency")

        default: TenantPolicy | None = None
        if "" not in self.entries["default_tenant"]:
            self.problems.append(PolicyProblem(origin, "default_tenant", "a default tenant template", "none"))
        else:
            file, body = self.entries["default_tenant"][""]
            if "name" in body and body["name"] != DEFAULT_TENANT_NAME:
                self.problems.append(PolicyProblem(file, "default_tenant.name", repr(DEFAULT_TENANT_NAME),
                                                   _found(body["name"])))
            else:
                default = self.tenant(file, "default_tenant", DEFAULT_TENANT_NAME, body, {}, residency)

        tenants: dict[str, TenantPolicy] = {}
        inherited = _as_fields(default) if default is not None else None
        for name, (file, body) in self.entries["tenants"].items():
            if name == DEFAULT_TENANT_NAME:
                self.problems.append(PolicyProblem(file, f"tenants.{name}", "the template under default_tenant",
                                                   "a tenant named 'default'"))
                continue
            if inherited is None:  # the template is broken (reported): check what the tenant names itself
                sla = body.get("sla_class")
                if isinstance(sla, str) and sla not in self._sla_names:
                    self.problems.append(PolicyProblem(file, f"tenants.{name}.sla_class",
                                                       f"one of {sorted(self._sla_names)}", repr(sla)))
                continue
            tenant = self.tenant(file, f"tenants.{name}", name, body, inherited, residency)
            if tenant is not None:
                tenants[name] = tenant

        retention: RetentionPolicy | None = None
        if "" not in self.entries["retention"]:
            self.problems.append(PolicyProblem(origin, "retention", "a retention section", "none"))
        else:
            file, body = self.entries["retention"][""]
            retention = self.validate(RetentionPolicy, file, "retention", body)

        if self.problems or default is None or retention is None:
            raise PolicyValidationError(self.located() or [PolicyProblem(origin, "<policy set>", "valid", "invalid")])
        return PolicySet(tenants=tenants, default_tenant=default, sla_classes=sla_classes, retention=retention,
                         residency=residency, sources=tuple(sources), digest=digest)


def _as_fields(tenant: TenantPolicy) -> dict[str, Any]:
    return {
        "allowed_models": list(tenant.allowed_models),
        "residency": tenant.residency,
        "sla_class": tenant.sla_class,
        "rate_limit_rpm": tenant.rate_limit_rpm,
        "max_tokens_per_request": tenant.max_tokens_per_request,
        "max_tokens_per_minute": tenant.max_tokens_per_minute,
        "max_concurrent_requests": tenant.max_concurrent_requests,
        "max_queued_tokens": tenant.max_queued_tokens,
        "max_tokens_per_day": tenant.max_tokens_per_day,
        "max_tokens_per_month": tenant.max_tokens_per_month,
    }


def read_policy_files(path: Path | str | None = None) -> list[tuple[str, bytes]]:
    """The policy files at ``path`` (``None``: the shipped defaults) as (path, bytes), in load order."""
    root = default_policy_dir() if path is None else Path(path)
    return [(str(file), file.read_bytes()) for file in _policy_files(root)]


def load_policy_files(files: list[tuple[str, bytes]], origin: str = "<policy set>") -> PolicySet:
    """Validate a policy set from (file name, contents) pairs, in the order given.

    ``origin`` names the set in problems that concern no single file (a missing section).
    Raises PolicyNotFoundError when ``files`` is empty and PolicyValidationError otherwise.
    """
    if not files:
        raise PolicyNotFoundError(f"{origin}: expected at least one policy file, found none")
    builder = _Builder()
    for file, data in files:
        builder.add_file(file, data)
    return builder.build([file for file, _ in files], policy_digest(files), origin)


def policy_digest(files: list[tuple[str, bytes]]) -> str:
    """The digest of a policy set: sha256 over each file's name and the sha256 of its bytes, in order
    (what ``PolicySet.digest`` holds; cheap enough to ask whether files on disk changed)."""
    digest = hashlib.sha256()
    for file, data in files:
        digest.update(Path(file).name.encode() + b"\0" + hashlib.sha256(data).digest())
    return "sha256:" + digest.hexdigest()


def load_policy_set(path: Path | str | None = None) -> PolicySet:
    """Load and validate a policy set from a file or directory (``None``: the shipped defaults).

    Raises PolicyNotFoundError when there is nothing to load and PolicyValidationError listing
    every problem (file, line, column, field, expected, found) otherwise.
    """
    root = default_policy_dir() if path is None else Path(path)
    return load_policy_files(read_policy_files(root), str(root))
