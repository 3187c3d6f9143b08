#!/usr/bin/python
"""Ansible module of sovereign-installer: place a release's files and check each one against the
sha256 signed in the bundle, in one task instead of three loops (copy, stat, assert) whose
per-item overhead dominated an install with many files (a wheelhouse is ~60 of them).

state=placed: for every file, a destination that already has the signed sha256 is left alone
(idempotent); otherwise the file is hard-linked from the verified staging directory when both are
on one filesystem (no bytes move) or copied with sendfile, written under a temporary name,
fsynced, chmodded, renamed into place, and then hashed again. state=verified only hashes.
With ``archive`` (an SSH node: the release travelled as one tar), the archive is first unpacked
into src_dir, accepting only regular files named in ``files`` (no links, no other paths).
Hashing runs on several threads (hashlib releases the GIL). Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: sovereign_release_files
short_description: Place release files from a verified staging directory and check their sha256
options:
  dest_dir: {type: path, required: true, description: The release directory.}
  src_dir: {type: path, description: The verified, unpacked bundle on this node (state=placed).}
  files: {type: list, elements: dict, required: true, description: "[{src, dest, sha256}] (src for placed)."}
  mode: {type: str, default: "0444", description: Mode of every placed file.}
  dir_mode: {type: str, default: "0755", description: Mode of directories created.}
  state: {type: str, choices: [placed, verified], default: placed}
  link: {type: bool, default: true, description: Hard-link from src_dir when on the same filesystem.}
  archive: {type: path, description: "A tar of the files (their src paths) to unpack into src_dir first."}
"""

CHUNK = 4 << 20


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while True:
            block = os.read(fd, CHUNK)
            if not block:
                break
            digest.update(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def current_hash(path: str) -> str | None:
    """sha256 of a regular file at path, None when there is none (a link counts as none)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return sha256_of(path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(src: str, dest: str, mode: int, link: bool) -> str:
    """Put src at dest atomically; returns "linked" or "copied"."""
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    how = "copied"
    if link:
        try:
            os.link(src, tmp, follow_symlinks=False)
            how = "linked"
        except OSError:
            how = "copied"
    if how == "copied":
        shutil.copyfile(src, tmp, follow_symlinks=False)  # sendfile on Linux
    os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    return how


def unpack(archive: str, dest: str, wanted: set[str]) -> int:
    """Unpack the release's files from ``archive`` into ``dest``; anything else is refused."""
    count = 0
    with tarfile.open(archive, "r:") as tar:
        for member in tar:
            if member.name not in wanted or not member.isreg():
                raise ValueError(f"{archive}: expected only the release's regular files, found {member.name!r}")
            target = os.path.join(dest, member.name)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise ValueError(f"{archive}: {member.name}: unreadable member")
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
            count += 1
    return count


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "dest_dir": {"type": "path", "required": True},
            "src_dir": {"type": "path"},
            "files": {"type": "list", "elements": "dict", "required": True},
            "mode": {"type": "str", "default": "0444"},
            "dir_mode": {"type": "str", "default": "0755"},
            "state": {"type": "str", "choices": ["placed", "verified"], "default": "placed"},
            "link": {"type": "bool", "default": True},
            "archive": {"type": "path"},
        },
        supports_check_mode=False,
    )
    p = module.params
    dest_dir, files, state = p["dest_dir"], p["files"], p["state"]
    if state == "placed" and not p["src_dir"]:
        module.fail_json(msg="src_dir: expected the staging directory to place files from, found nothing")
    try:
        mode, dir_mode = int(p["mode"], 8), int(p["dir_mode"], 8)
    except ValueError:
        module.fail_json(msg=f"mode/dir_mode: expected octal strings such as '0444', found {p['mode']!r}, "
                             f"{p['dir_mode']!r}")
    for item in files:
        dest, src = str(item.get("dest", "")), str(item.get("src", ""))
        if not dest or dest.startswith("/") or ".." in dest.split("/") or not item.get("sha256"):
            module.fail_json(msg=f"files: expected relative dest paths without '..' and a sha256, found {item!r}")
        if src.startswith("/") or ".." in src.split("/"):
            module.fail_json(msg=f"files: expected relative src paths without '..', found {item!r}")
    if p["archive"]:
        if state != "placed":
            module.fail_json(msg="archive: expected only with state=placed")
        try:
            unpack(p["archive"], p["src_dir"], {str(f.get("src", "")) for f in files})
        except (OSError, ValueError, tarfile.TarError) as exc:
            module.fail_json(msg=f"archive: expected a tar of the release files, found {exc}")

    started = time.monotonic()
    results: dict[str, str] = {}
    failures: list[str] = []
    total_bytes = 0

    def one(item: dict) -> tuple[str, str, int, str | None]:
        dest = os.path.join(dest_dir, item["dest"])
        want = str(item["sha256"]).lower()
        if state == "verified":
            have = current_hash(dest)
            if have != want:
                return item["dest"], "bad", 0, (f"{item['dest']}: expected sha256 {want}, "
                                                 f"found {have or 'no regular file'}")
            return item["dest"], "ok", os.path.getsize(dest), None
        if current_hash(dest) == want:
            if stat.S_IMODE(os.lstat(dest).st_mode) != mode:
                os.chmod(dest, mode)
                return item["dest"], "chmod", os.path.getsize(dest), None
            return item["dest"], "ok", os.path.getsize(dest), None
        src = os.path.join(p["src_dir"], item["src"])
        if not os.path.isfile(src) or os.path.islink(src):
            return item["dest"], "bad", 0, f"{item['src']}: expected a regular file in the staging directory"
        how = place(src, dest, mode, p["link"])
        have = sha256_of(dest)
        if have != want:
            return item["dest"], "bad", 0, f"{item['dest']}: expected sha256 {want}, found {have} after placing it"
        return item["dest"], how, os.path.getsize(dest), None

    try:
        if state == "placed":
            for directory in sorted({os.path.dirname(os.path.join(dest_dir, f["dest"])) for f in files} | {dest_dir}):
                if not os.path.isdir(directory):
                    os.makedirs(directory, mode=dir_mode, exist_ok=True)
                    os.chmod(directory, dir_mode)
        workers = max(1, min(8, os.cpu_count() or 1, len(files)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for dest, outcome, size, error in pool.map(one, files):
                results[dest] = outcome
                total_bytes += size
                if error:
                    failures.append(error)
        if state == "placed" and any(v in ("linked", "copied") for v in results.values()):
            for directory in sorted({os.path.dirname(os.path.join(dest_dir, f["dest"])) for f in files}):
                fsync_dir(directory)
    except OSError as exc:
        module.fail_json(msg=f"{exc.filename or dest_dir}: {exc.strerror or exc}", results=results)
    seconds = time.monotonic() - started
    counts = {k: sum(1 for v in results.values() if v == k) for k in ("ok", "linked", "copied", "chmod", "bad")}
    summary = {"files": len(files), "bytes": total_bytes, "seconds": round(seconds, 3), **counts}
    if failures:
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        module.fail_json(msg="; ".join(failures[:5]) + more, failures=failures, summary=summary)
    changed = counts["linked"] + counts["copied"] + counts["chmod"] > 0
    module.exit_json(changed=changed, summary=summary)


if __name__ == "__main__":
    main()
