"""Exceptions of the policies package: one root, specific subclasses, messages say expected vs found."""

from __future__ import annotations

from dataclasses import dataclass


class PolicyError(Exception):
    """Root of every error raised by the policies package."""


class PolicyNotFoundError(PolicyError):
    """The policy path given does not exist or holds no policy files."""


@dataclass(frozen=True)
class PolicyProblem:
    """One thing wrong with a policy document: where it is, what was expected and what was found.

    ``field`` is the place (``tenants.acme.sla_class``); ``line`` and ``column`` (1-based) the
    position in ``file`` of that value, or of the nearest enclosing one when the value is missing
    (``None`` when the problem concerns no single file, e.g. a section no file defines).
    """

    file: str
    field: str
    expected: str
    found: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: expected {self.expected}, found {self.found}"

    def located(self) -> str:
        """Like ``str`` with the position: ``FILE:LINE:COLUMN: place: expected ..., found ...``."""
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.field}: expected {self.expected}, found {self.found}"

    def to_dict(self) -> dict[str, str | int | None]:
        return {"file": self.file, "line": self.line, "column": self.column, "place": self.field,
                "expected": self.expected, "found": self.found}


class PolicyValidationError(PolicyError, ValueError):
    """A policy document is malformed or inconsistent.

    ``problems`` lists every problem found; ``file``/``field``/``expected``/``found`` repeat the
    first one for callers that only report one.
    """

    def __init__(self, problems: list[PolicyProblem]) -> None:
        if not problems:
            raise ValueError("PolicyValidationError needs at least one problem")
        self.problems = list(problems)
        first = self.problems[0]
        self.file = first.file
        self.field = first.field
        self.expected = first.expected
        self.found = first.found
        lines = [str(p) for p in self.problems]
        head = "invalid policy" if len(lines) == 1 else f"invalid policy ({len(lines)} problems)"
        super().__init__(head + ":\n  " + "\n  ".join(lines))

    @classmethod
    def single(cls, file: str, field: str, expected: str, found: str) -> PolicyValidationError:
        return cls([PolicyProblem(file=file, field=field, expected=expected, found=found)])
