"""``airgap-bundle`` CLI: import-model, wheelhouse, keys init/rotate, build, verify, unpack, inspect, split, join.

Exit codes: 0 ok; 1 verification failed (or the verified content changed while unpacking, or a
split part is missing, reordered or damaged); 2 usage or input error (missing files, bad keys,
bad arguments).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .build import build_bundle, default_created
from .cli_progress import RichProgress
from .errors import BundleError, UnpackError, VerificationError
from .hf_import import import_hf
from .inspection import inspect_bundle
from .keys import init_keys, rotate_keys
from .parts import join_parts, parse_size, split_bundle
from .report import VerificationReport
from .trust_state import commit_trust
from .unpack import unpack_bundle
from .verify import verify_bundle

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE = 0, 1, 2

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Build, sign, verify and unpack air-gap bundles.")
keys_app = typer.Typer(no_args_is_help=True, help="Offline signing keys.")
app.add_typer(keys_app, name="keys")

out_console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``, turning our errors into exit codes without tracebacks."""
    try:
        return action()
    except (VerificationError, UnpackError) as exc:
        _fail(str(exc), EXIT_VERIFY_FAILED)
    except (BundleError, ValueError, OSError) as exc:
        _fail(str(exc), EXIT_USAGE)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@app.command("import-model")
def import_model(
    out: Annotated[Path, typer.Option("--out", help="Output HF model directory.")],
    gguf: Annotated[Path | None, typer.Option("--gguf", help="GGUF file to convert.")] = None,
    hf: Annotated[Path | None, typer.Option("--hf", help="HF directory to validate and copy.")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | float16 | bfloat16 (GGUF only).")] = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Import a model: a GGUF file (dequantized to safetensors) or a Hugging Face directory."""
    if (gguf is None) == (hf is None):
        _fail("expected exactly one of --gguf FILE or --hf DIR")

    def run() -> Path:
        if gguf is not None:
            from .gguf_import import import_gguf

            with err_console.status(f"converting {gguf.name}", spinner="dots"):
                return import_gguf(gguf, out, dtype=dtype)
        assert hf is not None
        return import_hf(hf, out)

    result = _guard(run)
    files = sorted(p.name for p in result.iterdir())
    if as_json:
        _emit_json({"ok": True, "out": str(result), "files": files})
    else:
        out_console.print(f"[green]imported[/green] {result} ({', '.join(files)})")


@app.command("wheelhouse")
def wheelhouse(
    out: Annotated[Path, typer.Option("--out", help="Wheelhouse directory (created).")],
    requirement: Annotated[list[str] | None, typer.Argument(help="Requirements, e.g. 'pyyaml==6.0.2'.")] = None,
    requirements_file: Annotated[list[Path] | None, typer.Option("--requirement", "-r")] = None,
    platform: Annotated[str, typer.Option(help="Target platform tag.")] = "manylinux2014_x86_64",
    python_version: Annotated[str, typer.Option(help="Target Python, e.g. 3.11.")] = "3.11",
    implementation: Annotated[str, typer.Option(help="Target implementation tag.")] = "cp",
    find_links: Annotated[list[Path] | None, typer.Option("--find-links")] = None,
    no_index: Annotated[bool, typer.Option("--no-index", help="Only --find-links, no package index.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download wheels only (pip download) for the nodes' platform and Python, for 'build --wheelhouse'."""
    from .wheelhouse import WheelTarget, download_wheelhouse

    with err_console.status("pip download", spinner="dots") if not as_json else nullcontext():
        wheels = _guard(lambda: download_wheelhouse(
            requirement or [], out, WheelTarget(platform, python_version, implementation),
            requirement_files=requirements_file or [], find_links=find_links or [], no_index=no_index))
    if as_json:
        _emit_json({"ok": True, "out": str(out), "wheels": [p.name for p in wheels]})
    else:
        out_console.print(f"[green]wheelhouse[/green] {escape(str(out))}: {len(wheels)} wheel(s) for "
                          f"{escape(platform)} / Python {escape(python_version)}")


@keys_app.command("init")
def keys_init(
    keydir: Annotated[Path, typer.Argument(help="New key directory.")],
    root_threshold: int = 2, root_keys: int = 3,
    targets_threshold: int = 1, targets_keys: int = 1,
    snapshot_threshold: int = 1, snapshot_keys: int = 1,
    timestamp_threshold: int = 1, timestamp_keys: int = 1,
    root_expires_days: Annotated[int, typer.Option(min=1)] = 365,
    as_json: JsonOpt = False,
) -> None:
    """Generate Ed25519 keys (private files 0600) and the signed initial root KEYDIR/root.json."""
    thresholds = {"root": root_threshold, "targets": targets_threshold, "snapshot": snapshot_threshold,
                  "timestamp": timestamp_threshold}
    counts = {"root": root_keys, "targets": targets_keys, "snapshot": snapshot_keys, "timestamp": timestamp_keys}
    root = _guard(lambda: init_keys(keydir, thresholds, counts,
                                    root_expires=datetime.now(UTC) + timedelta(days=root_expires_days)))
    if as_json:
        _emit_json({"ok": True, "root": str(root), "thresholds": thresholds, "counts": counts})
    else:
        out_console.print(f"[green]keys created[/green] in {keydir}; give admins {root} (public) out of band")


@keys_app.command("rotate")
def keys_rotate(
    keydir: Annotated[Path, typer.Argument(help="Existing key directory.")],
    role: Annotated[list[str], typer.Option("--role", help="Role whose keys to replace (repeatable).")],
    root_expires_days: Annotated[int, typer.Option(min=1)] = 365,
) -> None:
    """Replace the keys of the given roles and sign the next root version with old and new root keys."""
    root = _guard(lambda: rotate_keys(keydir, role, root_expires=datetime.now(UTC) + timedelta(days=root_expires_days)))
    out_console.print(f"[green]rotated[/green] {', '.join(role)}; new root {root}")


def _parse_created(value: str | None) -> datetime:
    if value is None:
        return default_created()
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"--created: expected an ISO 8601 timestamp, found {value!r}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command("build")
def build(
    keys: Annotated[Path, typer.Option("--keys", help="Key directory from 'keys init'.")],
    version: Annotated[str, typer.Option("--version", help="Release version, e.g. 0.1.0.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle .tar path or an existing directory.")],
    model: Annotated[list[Path] | None, typer.Option(
        "--model", help="HF model directory (repeatable; the first is the default model).")] = None,
    policies: Annotated[Path | None, typer.Option("--policies")] = None,
    playbooks: Annotated[Path | None, typer.Option("--playbooks")] = None,
    wheelhouse: Annotated[Path | None, typer.Option("--wheelhouse")] = None,
    name: str = "sovereign-appliance",
    expires_days: Annotated[int, typer.Option("--expires-days", min=1)] = 90,
    created: Annotated[str | None, typer.Option(help="ISO timestamp (default $SOURCE_DATE_EPOCH or now).")] = None,
    base_manifest: Annotated[Path | None, typer.Option(
        "--base-manifest", help="manifest.json of the installed release: build a delta bundle.")] = None,
    chunk_size: Annotated[str, typer.Option(
        "--chunk-size", help="Files larger than this also get signed per-chunk sha256 (parallel verify).")] = "64M",
    split_size: Annotated[str | None, typer.Option(
        "--split-size", help="Also write the bundle as parts of at most this size (e.g. 4G) into <bundle>.parts/.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build one signed, deterministic bundle tar (optionally also split into parts for removable media)."""
    when = _parse_created(created)
    chunk_bytes = _guard(lambda: parse_size(chunk_size))
    part_bytes = _guard(lambda: parse_size(split_size)) if split_size is not None else None
    with RichProgress(err_console, enabled=not as_json) as progress:
        bundle = _guard(lambda: build_bundle(
            out, keys, version, when + timedelta(days=expires_days), model_dirs=model or [], policies_dir=policies,
            playbooks_dir=playbooks, wheelhouse=wheelhouse, name=name, created=when, progress=progress,
            base_manifest=base_manifest, chunk_bytes=chunk_bytes))
    index = None
    if part_bytes is not None:
        with RichProgress(err_console, enabled=not as_json) as progress:
            index = _guard(lambda: split_bundle(bundle, bundle.parent / f"{bundle.name}.parts", part_bytes,
                                                progress=progress))
    if as_json:
        _emit_json({"ok": True, "bundle": str(bundle), "size": bundle.stat().st_size,
                    "parts_index": str(index) if index else None})
    else:
        out_console.print(f"[green]built[/green] {bundle} ({bundle.stat().st_size} bytes)")
        if index is not None:
            out_console.print(f"[green]split[/green] into parts; index {escape(str(index))}")


def _print_report(report: VerificationReport) -> None:
    table = Table(title=escape(report.bundle))
    for column in ("#", "check", "result"):
        table.add_column(column)
    table.add_column("detail", overflow="fold")  # hashes and paths in full
    for check in report.checks:
        result = "[green]pass[/green]" if check.passed else "[dim]skipped[/dim]" if check.skipped else "[red]FAIL[/red]"
        if check.passed and check.detail.startswith("NOT CHECKED"):
            result = "[yellow]not checked[/yellow]"  # no --state: nothing to compare versions with
        detail = check.detail + (f" [{check.path}]" if check.path and not check.passed else "")
        table.add_row(str(check.number), check.name, result, escape(detail))
    out_console.print(table)
    if report.ok:
        out_console.print(f"[green]verified[/green] {report.name} {report.version} {report.digest}")


def _verify(bundle: Path, root: Path, state: Path | None, workers: int | None, as_json: bool,
            base: Path | None) -> VerificationReport:
    with RichProgress(err_console, enabled=not as_json) as progress:
        return _guard(lambda: verify_bundle(bundle, root, state, workers=workers, progress=progress, base_dir=base))


RootOpt = Annotated[Path, typer.Option("--root", help="Trusted root.json received out of band.")]
StateOpt = Annotated[Path | None, typer.Option("--state", help="Trusted-state directory (rollback protection).")]
BaseOpt = Annotated[Path | None, typer.Option("--base", help="Installed release directory (delta bundles).")]


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument()],
    root: RootOpt,
    state: StateOpt = None,
    commit: Annotated[bool, typer.Option(help="Persist the verified versions into --state.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Parallel target hashing.")] = None,
    base: BaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify a bundle offline (8 numbered checks). Exit 1 when any check fails."""
    if commit and state is None:
        _fail("--commit needs --state DIR")
    report = _verify(bundle, root, state, workers, as_json, base)
    if as_json:
        _emit_json(report.to_dict())
    else:
        _print_report(report)
    if not report.ok:
        failed = report.first_failure()
        if not as_json and failed is not None:
            err_console.print(f"[red]verification failed[/red] at check {escape(failed.label)} "
                              f"{escape(f'[{failed.path}]')}: {escape(failed.detail)}", highlight=False)
        raise typer.Exit(EXIT_VERIFY_FAILED)
    if commit and state is not None:
        _guard(lambda: commit_trust(report, state))


@app.command("unpack")
def unpack(
    bundle: Annotated[Path, typer.Argument()],
    root: RootOpt,
    dest: Annotated[Path, typer.Option("--dest", help="Absent or empty destination directory.")],
    state: StateOpt = None,
    commit: Annotated[bool, typer.Option(help="Persist trusted state after a successful unpack.")] = True,
    base: BaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify, then unpack the signed targets into DEST (atomically). Verification always runs."""
    report = _verify(bundle, root, state, None, as_json, base)
    if not report.ok:
        if as_json:
            _emit_json(report.to_dict())
        else:
            _print_report(report)
        raise typer.Exit(EXIT_VERIFY_FAILED)
    with RichProgress(err_console, enabled=not as_json) as progress:
        written = _guard(lambda: unpack_bundle(bundle, dest, report, progress=progress))
    if commit and state is not None:
        _guard(lambda: commit_trust(report, state))
    if as_json:
        _emit_json({"ok": True, "dest": str(dest), "files": [str(p) for p in written], "digest": report.digest})
    else:
        out_console.print(f"[green]unpacked[/green] {len(written)} files into {dest}")


@app.command("split")
def split(
    bundle: Annotated[Path, typer.Argument()],
    out: Annotated[Path, typer.Option("--out", help="Directory for the parts and the index.")],
    part_size: Annotated[str, typer.Option("--part-size", help="e.g. 4G, 512M.")] = "3G",
    as_json: JsonOpt = False,
) -> None:
    """Split a bundle into parts (index not signed: verify after joining)."""
    size = _guard(lambda: parse_size(part_size))
    with RichProgress(err_console, enabled=not as_json) as progress:
        index = _guard(lambda: split_bundle(bundle, out, size, progress=progress))
    if as_json:
        _emit_json({"ok": True, "index": str(index)})
    else:
        out_console.print(f"[green]split[/green] into {escape(str(out))}; index {escape(str(index))}")


@app.command("join")
def join(
    index: Annotated[Path, typer.Argument(help="The <bundle>.parts.json index.")],
    out: Annotated[Path, typer.Option("--out", help="Joined bundle .tar path.")],
    as_json: JsonOpt = False,
) -> None:
    """Join parts back into one bundle tar (then run 'verify' on it)."""
    with RichProgress(err_console, enabled=not as_json) as progress:
        joined = _guard(lambda: join_parts(index, out, progress=progress))
    if as_json:
        _emit_json({"ok": True, "bundle": str(joined)})
    else:
        out_console.print(f"[green]joined[/green] {escape(str(joined))}; now run: airgap-bundle verify")


@app.command("inspect")
def inspect(bundle: Annotated[Path, typer.Argument()], as_json: JsonOpt = False) -> None:
    """Show what a bundle claims to contain. NOT a verification."""
    info = _guard(lambda: inspect_bundle(bundle))
    if as_json:
        _emit_json(info)
        return
    table = Table(title=escape(f"{bundle} (unverified)"))
    for column in ("metadata", "version", "expires", "signed by"):
        table.add_column(column)
    for name, meta in info["metadata"].items():
        table.add_row(escape(name), str(meta.get("version", "?")), str(meta.get("expires", "?")),
                      escape(", ".join(meta.get("signed_by", [])) or meta.get("error", "")))
    out_console.print(table)
    targets = Table(title="targets")
    targets.add_column("path")
    targets.add_column("bytes", justify="right")
    for path, size in info["targets"].items():
        targets.add_row(escape(path), str(size))
    out_console.print(targets)
    manifest = info["manifest"] if isinstance(info["manifest"], dict) else {}
    models = info["models"]
    if isinstance(models, dict):
        out_console.print(f"models: {escape(str(models.get('error')))}", highlight=False)
    elif models:
        table = Table(title="models (default first)")
        for column in ("name", "path", "licence", "files", "bytes"):
            table.add_column(column, justify="right" if column in ("files", "bytes") else "left")
        for m in models:
            table.add_row(escape(m["name"]), escape(m["path"] + "/"), escape(str(m["license"] or "?")),
                          str(m["files"]), str(m["bytes"]))
        out_console.print(table)
    out_console.print(f"{escape(str(manifest.get('name', '?')))} {escape(str(manifest.get('version', '?')))}, "
                      f"digest {info['digest']} (unverified)", highlight=False)
    sbom = info["sbom"] or {}
    if "error" in sbom or not sbom:
        out_console.print(f"SBOM: {escape(str(sbom.get('error', 'none')))}", highlight=False)
    else:
        models = ", ".join(
            f"{m['name']} ({', '.join(str(x) for x in m['licenses']) or 'no licence'}, {m['files']} files)"
            for m in sbom["models"]) or "none"
        out_console.print(escape(f"SBOM {sbom['format']}: {sbom['components']} components; models {models}; "
                                 f"{len(sbom['wheels'])} wheel(s) {', '.join(sbom['wheels'])}"), highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
