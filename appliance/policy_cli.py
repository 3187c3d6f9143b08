"""``appliance policy``: the policy files' schema, their validation, applying them, and what is in force.

The set in force on a root is the release's policy files (``policies_dir``, never written) with
the applied files, ROOT/data/policies, laid over them by name (``policies.effective``).

- ``schema`` prints the JSON Schema of one policy file (``policies.schema``).
- ``validate FILE_OR_DIR...`` checks files as the gateway would load them and prints every problem
  as ``FILE:LINE:COLUMN: place: expected ..., found ...``; exit 1 on any problem, 0 with a summary.
  The files are the whole set unless ``--root`` lays them over the root's set in force, as
  ``apply`` would (or ``--over DIR`` over a policy directory).
- ``apply FILE_OR_DIR... --root R`` validates the same way, then: when the root's gateway is
  running (its run marker names a live process), sends the files to its admin API
  (``POST /admin/v1/policies`` with the root's admin key, ROOT/secrets/admin.key, over TLS checked
  against ROOT/tls/ca.pem), which writes them and swaps its policy without restart; otherwise
  writes them into ROOT/data/policies for the next start and records ``admin.policy_applied``.
  It says which it did. Exit 0 applied, 1 invalid, 2 could not apply.
- ``reset [FILE...] --root R`` removes applied files (all, or those named), so the release's policy
  is in force again: through the running gateway (``DELETE /admin/v1/policies``) or directly,
  validated first and recorded (``reset: true``), with the same exit codes.
- ``show --root R`` lists the files in force, where each comes from, and the digests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from appliance.errors import ApplianceError
from appliance.policy_change import apply_running, apply_stopped, call_running, gateway_running, reset_stopped
from policies import PolicySet, load_policy_files
from policies.apply import overlay, without
from policies.effective import APPLIED, applied_policy_dir, files_in_force, in_force_digest, load_in_force
from policies.errors import PolicyError, PolicyValidationError
from policies.schema import policy_schema_json

EXIT_OK, EXIT_INVALID, EXIT_ERROR = 0, 1, 2
policy_app = typer.Typer(help="Policy files: schema, validate, apply without restart.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

PathsArg = Annotated[list[Path], typer.Argument(help="Policy YAML files or directories of them.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def _collect(paths: list[Path]) -> dict[str, tuple[Path, bytes]]:
    """name -> (path, bytes) of every policy file named or inside a directory named (not recursive)."""
    found: dict[str, tuple[Path, bytes]] = {}
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not files:
                raise typer.BadParameter(f"{path}: expected *.yaml files in the directory, found none")
        elif path.is_file():
            files = [path]
        else:
            raise typer.BadParameter(f"{path}: expected a policy file or directory, found nothing there")
        for file in files:
            if file.name in found and found[file.name][0].resolve() != file.resolve():
                raise typer.BadParameter(f"{file}: expected one file per name (a set holds one {file.name}), "
                                         f"found a second beside {found[file.name][0]}")
            found[file.name] = (file, file.read_bytes())
    return found


def _print_problems(exc: PolicyValidationError, as_json: bool, renamed: dict[str, str] | None = None) -> None:
    """Every problem, one a line; ``renamed`` maps a file's place in the policy directory back to
    the path the user gave."""
    problems = [dataclasses.replace(p, file=(renamed or {}).get(p.file, p.file)) for p in exc.problems]
    if as_json:
        print(json.dumps({"valid": False, "problems": [p.to_dict() for p in problems]}, indent=2))
        return
    for problem in problems:
        print(problem.located())
    files = {p.file for p in problems}
    err.print(f"invalid: {len(problems)} problem(s) in {len(files)} file(s)", markup=False)


def _renamed(base: Path | None, files: dict[str, tuple[Path, bytes]]) -> dict[str, str]:
    return {} if base is None else {str(base / name): str(path) for name, (path, _) in files.items()}


def _summary(policies: PolicySet) -> dict[str, Any]:
    return {"valid": True, "digest": policies.digest, "files": [Path(s).name for s in policies.sources],
            "sla_classes": sorted(policies.sla_classes), "tenants": sorted(policies.tenants)}


def _base(root: Path | None, over: Path | None) -> tuple[Path, Path | None] | None:
    """(release policies, applied directory) the files are laid over, if any."""
    if root is not None and over is not None:
        raise typer.BadParameter("expected --root or --over, found both")
    if root is not None:
        from appliance.config import load_config

        config = load_config(root)
        return config.policies_dir, applied_policy_dir(config.data_dir)
    return None if over is None else (over, None)


def _placed(base: tuple[Path, Path | None] | None) -> Path | None:
    """The directory the files given are named under in problems from ``overlay``."""
    if base is None:
        return None
    release, applied = base
    return applied if applied is not None else release if release.is_dir() else release.parent


@policy_app.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema (draft 2020-12) of one policy file."""
    print(policy_schema_json(), end="")


@policy_app.command("validate")
def validate_cmd(
    paths: PathsArg,
    root: Annotated[Path | None, typer.Option("--root", help="Validate laid over this install root's policies, "
                                                           "as `apply` would.")] = None,
    over: Annotated[Path | None, typer.Option("--over", help="Validate laid over this policy directory.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check policy files; print every problem with file, line and column. Exit 1 if any."""
    files: dict[str, tuple[Path, bytes]] = {}
    base: tuple[Path, Path | None] | None = None
    try:
        files = _collect(paths)
        base = _base(root, over)
        if base is not None:
            policies = overlay(base[0], base[1], {name: data for name, (_, data) in files.items()})
        else:
            ordered = sorted(((str(path), data) for path, data in files.values()), key=lambda f: Path(f[0]).name)
            policies = load_policy_files(ordered, ", ".join(str(p) for p in paths))
    except PolicyValidationError as exc:
        _print_problems(exc, as_json, _renamed(_placed(base), files))
        raise typer.Exit(EXIT_INVALID) from None
    except (PolicyError, ApplianceError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    summary = _summary(policies)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"valid: {len(summary['files'])} file(s), {len(summary['sla_classes'])} SLA class(es) "
          f"{summary['sla_classes']}, {len(summary['tenants'])} tenant(s), digest {policies.digest}")


@policy_app.command("apply")
def apply_cmd(
    paths: PathsArg,
    root: Annotated[Path, typer.Option("--root", help="Install root of the appliance.")] = Path("var"),
    admin_key_file: Annotated[Path | None, typer.Option(
        "--admin-key-file", help="An admin key for the running gateway (default ROOT/secrets/admin.key).")] = None,
    url: Annotated[str | None, typer.Option(
        "--url", help="The running gateway's https://HOST:PORT when not appliance.yaml's (serve --port).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply policy files: to the running gateway without restart, else for the next start."""
    from appliance.config import load_config

    collected: dict[str, tuple[Path, bytes]] = {}
    base: Path | None = None
    try:
        config = load_config(root)
        base = applied_policy_dir(config.data_dir)
        collected = _collect(paths)
        files = {name: data for name, (_, data) in collected.items()}
        overlay(config.policies_dir, base, files)  # checked here first: problems with lines, nothing sent
        if gateway_running(config.data_dir):
            result = apply_running(config, files, admin_key_file or config.secrets_dir / "admin.key", url)
        else:
            result = apply_stopped(config, files)
    except PolicyValidationError as exc:
        _print_problems(exc, as_json, {**_renamed(base, collected), **{n: str(p) for n, (p, _) in collected.items()}})
        raise typer.Exit(EXIT_INVALID) from None
    except (PolicyError, ApplianceError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    if as_json:
        print(json.dumps(result, indent=2))
        return
    where = ("applied to the running gateway at " + result["gateway"] + " (in force for new requests now)"
             if result["running"] else
             f"no gateway running: wrote {', '.join(result['files'])} to {result['applied_dir']} "
             "(in force at the next start)")
    print(f"{where}; policy digest {result['old_digest']} -> {result['new_digest']}")


@policy_app.command("reset")
def reset_cmd(
    names: Annotated[list[str] | None, typer.Argument(
        help="Applied files to remove (names, as `show` lists them); none: every applied file.")] = None,
    root: Annotated[Path, typer.Option("--root", help="Install root of the appliance.")] = Path("var"),
    admin_key_file: Annotated[Path | None, typer.Option(
        "--admin-key-file", help="An admin key for the running gateway (default ROOT/secrets/admin.key).")] = None,
    url: Annotated[str | None, typer.Option(
        "--url", help="The running gateway's https://HOST:PORT when not appliance.yaml's (serve --port).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove applied policy files (all, or those named): the release's policy is in force again."""
    from appliance.config import load_config

    try:
        config = load_config(root)
        wanted = [Path(n).name for n in names] if names else None
        without(config.policies_dir, applied_policy_dir(config.data_dir), wanted)  # checked here first
        if gateway_running(config.data_dir):
            params = [("file", n) for n in wanted] if wanted else None
            result = call_running(config, admin_key_file or config.secrets_dir / "admin.key", url, "DELETE",
                                   params=params)
        else:
            result = reset_stopped(config, wanted)
    except PolicyValidationError as exc:
        err.print("the policy that would remain is invalid; nothing removed:", markup=False)
        _print_problems(exc, as_json)
        raise typer.Exit(EXIT_INVALID) from None
    except (PolicyError, ApplianceError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    if as_json:
        print(json.dumps(result, indent=2))
        return
    where = ("the running gateway at " + result["gateway"] + " removed" if result["running"] else
             "no gateway running: removed")
    print(f"{where} {', '.join(result['files'])} from {result['applied_dir']}; policy digest "
          f"{result['old_digest']} -> {result['new_digest']}")


@policy_app.command("show")
def show_cmd(
    root: Annotated[Path, typer.Option("--root", help="Install root of the appliance.")] = Path("var"),
    as_json: JsonOpt = False,
) -> None:
    """List the policy files in force, where each comes from (release or applied), and the digests."""
    import hashlib

    from rich.table import Table

    from appliance.config import load_config

    try:
        config = load_config(root)
        release, applied = config.policies_dir, applied_policy_dir(config.data_dir)
        files = files_in_force(release, applied)
        digest = in_force_digest(release, applied)
        try:
            load_in_force(release, applied)
            problems = 0
        except PolicyValidationError as exc:
            problems = len(exc.problems)
    except (PolicyError, ApplianceError) as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_ERROR) from None
    rows: list[dict[str, Any]] = [{"name": f.name, "origin": f.origin, "path": str(f.path),
             "replaces": str(f.replaces) if f.replaces is not None else None,
             "sha256": hashlib.sha256(f.path.read_bytes()).hexdigest()} for f in files]
    doc = {"digest": digest, "valid": problems == 0, "problems": problems, "release_dir": str(release),
           "applied_dir": str(applied), "files": rows}
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    table = Table("file", "from", "path", "sha256")
    for row in rows:
        origin = row["origin"] + (" (replaces the release's)" if row["replaces"] else "")
        table.add_row(row["name"], origin, row["path"], row["sha256"][:16])
    console.print(table)
    state = "valid" if not problems else f"INVALID ({problems} problem(s): run `appliance policy validate`)"
    applied_count = sum(1 for f in files if f.origin == APPLIED)
    print(f"policy digest {digest}, {state}; {applied_count} applied file(s) in {applied}")
