#!/usr/bin/env python3
"""Builder of the appliance runtime: a virtual environment made from a release's wheels, offline.

Installed by sovereign-installer as ROOT/bin/runtimectl and run by its playbooks with the node's
python3; standard library only. Every command prints one JSON object on stdout whose first key is
"sovereign_runtime" (the installer's event callback forwards it) and exits 0 on success, 1 on failure.

  ensure --root R --id ID --wheels DIR --requirements FILE [--python PY] [--timeout S]
         Makes R/runtimes/ID unless it is there already (changed: false). ID is content-addressed
         (runtime_id below), so releases with the same wheels share one runtime. The build is
         atomic: `PY -m venv` into R/runtimes/.ID.building-<pid>, then
         `pip install --isolated --no-index --find-links DIR --require-hashes -r FILE` with every
         PIP_* variable dropped and PIP_CONFIG_FILE=/dev/null (no index, no pip.conf, no network),
         `pip check`, runtime.json written, and a rename into place. A failure leaves nothing behind.
  check  --root R --id ID
         Whether R/runtimes/ID is a complete runtime (its runtime.json and bin/appliance exist).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TAIL_LINES = 8
ERROR_LINES = 12
DEFAULT_TIMEOUT_S = 3600.0
# The whole environment of venv and pip: nothing inherited can name an index, a proxy, a
# config file or a constraint (PIP_*, PYTHON*, http(s)_proxy and the rest are left behind).
PASS_ENV = ("PATH", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE")
WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._]*?)-(?P<version>[^-]+)(?:-\d[^-]*)?"
                   r"-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl$")
# The tags this python supports, as pip sees them (pip is inside the new runtime).
TAGS_CODE = ("import platform; from pip._vendor.packaging.tags import sys_tags; "
             "print(platform.python_version(), platform.machine(), *(str(t) for t in sys_tags()))")


def emit(ok: bool, **fields: Any) -> int:
    sys.stdout.write(json.dumps({"sovereign_runtime": "ok" if ok else "failed", **fields}) + "\n")
    return 0 if ok else 1


class Failed(Exception):
    """A build step failed; the message says which and why."""


def runtime_id(wheels: dict[str, str]) -> str:
    """First 16 hex digits of sha256 over the sorted "<wheel file> <sha256>" lines (the same
    definition as installer/runtime.py)."""
    text = "".join(f"{name} {digest}\n" for name, digest in sorted(wheels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if "LD_LIBRARY_PATH_ORIG" in os.environ:  # a frozen installer's loader path must not reach pip
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH_ORIG"]
    if not any(env.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        env["LC_ALL"] = "C.UTF-8"
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no config file at all, not even the global one
    env["PYTHONNOUSERSITE"] = "1"
    return env


def tail(text: str, lines: int = TAIL_LINES) -> str:
    kept = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:]) or "no output"


def run(argv: list[str], what: str, timeout_s: float, hint: str = "") -> str:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", env=clean_env(), timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{what}: expected to finish within {timeout_s:.0f} s, found it still running") from exc
    except OSError as exc:
        raise Failed(f"{what}: could not run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        lines = proc.stdout.splitlines()
        first_error = next((i for i, ln in enumerate(lines) if ln.startswith("ERROR")), 0)
        detail = tail("\n".join(lines[first_error:]), ERROR_LINES)
        raise Failed(f"{what}: expected exit code 0, found {proc.returncode}{hint}:\n{detail}")
    return proc.stdout


def wheel_tags(name: str) -> set[str]:
    match = WHEEL.match(name)
    if not match:
        return set()
    return {f"{py}-{abi}-{plat}" for py in match["python"].split(".") for abi in match["abi"].split(".")
            for plat in match["platform"].split(".")}


def check_tags(python: Path, wheels: list[Path], timeout_s: float) -> None:
    """Every wheel must fit this node's Python and platform (pip would only say "no matching
    distribution"; this names the wheel)."""
    version, machine, *tags = run([str(python), "-c", TAGS_CODE], "reading the tags this python supports",
                                  timeout_s).split()
    supported = set(tags)
    misfits = [w.name for w in wheels if not wheel_tags(w.name) & supported]
    if misfits:
        raise Failed(f"wheels that do not fit this node (Python {version}, {machine}): expected wheels tagged "
                     f"for this python such as {', '.join(tags[:3])}, found {', '.join(misfits)}")


def relocate(tmp: Path, final: Path) -> None:
    """Console scripts and pyvenv.cfg name the venv's own path: point them at the final one."""
    old, new = str(tmp).encode(), str(final).encode()
    for path in [*sorted((tmp / "bin").iterdir()), tmp / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > (1 << 20):
            continue
        data = path.read_bytes()
        if old in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            path.chmod(mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_record(final: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((final / "runtime.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build(args: argparse.Namespace, final: Path) -> dict[str, Any]:
    wheels_dir = Path(args.wheels)
    wheels = sorted(p for p in wheels_dir.iterdir() if p.is_file() and p.name.endswith(".whl"))
    if not wheels:
        raise Failed(f"{wheels_dir}: expected the release's wheels, found none")
    digests = {w.name: sha256_file(w) for w in wheels}
    found = runtime_id(digests)
    if found != args.id:
        raise Failed(f"{wheels_dir}: expected wheels whose runtime id is {args.id}, found {found}")
    python = args.python or sys.executable
    tmp = final.parent / f".{args.id}.building-{os.getpid()}"
    started = time.monotonic()
    try:
        run([python, "-m", "venv", str(tmp)], f"{python} -m venv", args.timeout,
            " (the node's python3 needs the venv module and ensurepip, e.g. Debian's python3-venv package)")
        venv_python = tmp / "bin" / "python"
        check_tags(venv_python, wheels, args.timeout)
        run([str(venv_python), "-m", "pip", "install", "--isolated", "--no-index", "--find-links", str(wheels_dir),
             "--require-hashes", "--no-cache-dir", "--no-input", "--disable-pip-version-check", "--progress-bar",
             "off", "-r", str(args.requirements)], "pip install --no-index from the release's wheels", args.timeout)
        run([str(venv_python), "-m", "pip", "check", "--isolated", "--disable-pip-version-check"],
            "pip check of the runtime", args.timeout)
        if not (tmp / "bin" / "appliance").is_file():
            raise Failed("expected the wheels to provide the `appliance` command (the sovereign-appliance wheel), "
                         "found no bin/appliance in the runtime")
        info = run([str(venv_python), "-c", "import platform, sys; print(platform.python_version(), "
                    "sys._base_executable)"], "asking the runtime's python its version", args.timeout).split(None, 1)
        relocate(tmp, final)
        record = {
            "id": args.id, "python": info[0], "base_python": info[1].strip() if len(info) > 1 else "",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_s": round(time.monotonic() - started, 3),
            "wheels": [{"file": name, "sha256": digest} for name, digest in sorted(digests.items())],
        }
        (tmp / "runtime.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return record
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_ensure(args: argparse.Namespace) -> int:
    if not re.fullmatch(r"[0-9a-f]{16}", args.id):
        return emit(False, changed=False, message=f"--id: expected 16 hex digits, found {args.id!r}")
    runtimes = Path(os.path.abspath(args.root)) / "runtimes"
    final = runtimes / args.id
    record = read_record(final)
    if record is not None and (final / "bin" / "appliance").is_file():
        return emit(True, changed=False, id=args.id, path=str(final), wheels=len(record.get("wheels", [])),
                    message=f"runtime {args.id} reused ({len(record.get('wheels', []))} wheels, built "
                            f"{record.get('created', '?')})")
    runtimes.mkdir(mode=0o755, parents=True, exist_ok=True)
    # left by a build that was killed (the installer's lock on ROOT rules out one still running)
    for stale in runtimes.glob(".*.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # incomplete (no runtime.json): never used, rebuilt from scratch
        shutil.rmtree(final)
    try:
        record = build(args, final)
    except Failed as exc:
        return emit(False, changed=False, id=args.id, message=str(exc))
    return emit(True, changed=True, id=args.id, path=str(final), wheels=len(record["wheels"]),
                build_s=record["build_s"],
                message=f"runtime {args.id} built from {len(record['wheels'])} wheels with pip --no-index "
                        f"in {record['build_s']:.1f} s")


def cmd_check(args: argparse.Namespace) -> int:
    final = Path(os.path.abspath(args.root)) / "runtimes" / args.id
    record = read_record(final)
    if record is None or not (final / "bin" / "appliance").is_file():
        return emit(False, changed=False, id=args.id, message=f"expected a runtime at {final} (runtime.json and "
                    "bin/appliance), found none; install the release's bundle again to rebuild it")
    return emit(True, changed=False, id=args.id, path=str(final), message=f"runtime {args.id} present")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runtimectl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ensure = sub.add_parser("ensure")
    ensure.add_argument("--root", required=True)
    ensure.add_argument("--id", required=True)
    ensure.add_argument("--wheels", required=True)
    ensure.add_argument("--requirements", required=True)
    ensure.add_argument("--python", default="")
    ensure.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    check = sub.add_parser("check")
    check.add_argument("--root", required=True)
    check.add_argument("--id", required=True)
    args = parser.parse_args(argv)
    return cmd_ensure(args) if args.command == "ensure" else cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
