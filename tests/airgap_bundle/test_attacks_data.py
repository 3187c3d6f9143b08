"""Attacks on target data and tar structure: endless data, chunk tampering, hidden bytes, unpack escapes.

"Endless data" members are sparse files: a header claims 64 GiB, the file system stores a hole.
The verifier must refuse them without reading the claimed bytes; a progress sink counts what it
hashed.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airgap_bundle import UnpackError, unpack_bundle, verify_bundle
from airgap_bundle.layout import MIN_CHUNK_BYTES, Limits
from airgap_bundle.report import CheckResult, VerificationReport
from airgap_bundle.tar_reader import scan_members
from tests.airgap_bundle.conftest import Inputs, read_members, resign, write_members

HUGE = 64 * 1024**3
MODEL = "model/model.safetensors"


class Counter:
    """A ProgressSink that counts the bytes the verifier hashed."""

    def __init__(self) -> None:
        self.hashed = 0

    def begin(self, label: str, total_bytes: int) -> None:
        return None

    def advance(self, nbytes: int) -> None:
        self.hashed += nbytes

    def end(self) -> None:
        return None


def failure(report: VerificationReport) -> CheckResult:
    failed = report.first_failure()
    assert failed is not None and not report.ok, "expected the bundle to be rejected"
    return failed


def write_sparse(path: Path, entries: list[tuple[str, bytes | int]], tail_hole: int = 0) -> Path:
    """A GNU tar whose int entries are holes of that size (sparse on disk), then end marker (+ hole)."""
    with open(path, "wb") as out:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            out.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict"))
            if isinstance(data, int):
                out.seek(data, 1)
            else:
                out.write(data)
            out.seek(-info.size % tarfile.BLOCKSIZE, 1)
        out.write(tarfile.NUL * 2 * tarfile.BLOCKSIZE)
        out.seek(tail_hole, 1)
        out.truncate()
    return path


def entries(bundle: Path, replace: dict[str, bytes | int] | None = None) -> list[tuple[str, bytes | int]]:
    replace = replace or {}
    return [(info.name, replace.get(info.name, data)) for info, data in read_members(bundle)]


def test_endless_target_is_refused_without_reading_it(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = write_sparse(tmp_path / "endless.tar", entries(bundle, {f"targets/{MODEL}": HUGE}))
    assert bad.stat().st_size > HUGE  # apparent size; the blocks are a hole
    counter = Counter()
    failed = failure(verify_bundle(bad, keydir / "root.json", progress=counter))
    assert failed.number == 8 and failed.path == MODEL and f"expected 4096 bytes, found {HUGE}" in failed.detail
    assert counter.hashed == 0


def test_endless_metadata_is_refused_without_reading_it(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    bad = write_sparse(tmp_path / "endless.tar", entries(bundle, {"metadata/timestamp.json": HUGE}))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "metadata/timestamp.json"
    assert f"expected metadata of at most {16 * 1024 * 1024} bytes, found {HUGE}" in failed.detail


def test_endless_tail_after_the_archive_is_refused_without_reading_it(bundle: Path, keydir: Path,
                                                                      tmp_path: Path) -> None:
    bad = write_sparse(tmp_path / "tail.tar", entries(bundle), tail_hole=HUGE)
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == str(bad) and "trailing data" in failed.detail


def test_endless_long_name_header_is_refused_without_reading_it(bundle: Path, keydir: Path,
                                                                tmp_path: Path) -> None:
    bad = tmp_path / "longname.tar"
    longname = tarfile.TarInfo("././@LongLink")
    longname.type = tarfile.GNUTYPE_LONGNAME
    longname.size = HUGE
    with open(bad, "wb") as out:
        out.write(longname.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict"))
        out.seek(HUGE, 1)
        out.write(tarfile.NUL * 2 * tarfile.BLOCKSIZE)
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == str(bad) and "header records of at most" in failed.detail


def test_data_hidden_in_block_padding(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    members = scan_members(bundle, Limits())
    policy = members["targets/policies/tenants.yaml"]
    data = bytearray(bundle.read_bytes())
    data[policy.offset + policy.size] = 0x41  # first padding byte after the member's data
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 1 and failed.path == "targets/policies/tenants.yaml" and "hidden data" in failed.detail


# --- large targets verified by signed chunk hashes --------------------------------------------------------------


@pytest.fixture
def chunked(tmp_path: Path, inputs: Inputs, build: Callable[..., Path]) -> Path:
    """A bundle whose 3.5-chunk model file carries signed chunk hashes (1 MiB chunks)."""
    (inputs.model / "model.safetensors").write_bytes(bytes(range(256)) * (MIN_CHUNK_BYTES * 7 // 512))
    return build("chunked.tar", chunk_bytes=MIN_CHUNK_BYTES)


def test_large_target_verifies_by_chunks_in_parallel(chunked: Path, keydir: Path) -> None:
    serial = verify_bundle(chunked, keydir / "root.json", workers=1)
    parallel = verify_bundle(chunked, keydir / "root.json", workers=3)
    assert serial.ok and parallel.ok and serial.targets == parallel.targets
    assert "1 large target(s) by signed chunk hashes" in parallel.checks[7].detail


def test_tampered_byte_in_a_chunk_names_the_chunk(chunked: Path, keydir: Path, tmp_path: Path) -> None:
    member = scan_members(chunked, Limits())[f"targets/{MODEL}"]
    data = bytearray(chunked.read_bytes())
    data[member.offset + 2 * MIN_CHUNK_BYTES + 5] ^= 0x01
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    failed = failure(verify_bundle(bad, keydir / "root.json", workers=2))
    assert failed.number == 8 and failed.path == MODEL and "chunk 2 (1048576 bytes each)" in failed.detail


def _chunk_edit(change: Callable[[dict[str, Any]], None]) -> dict[str, Callable[[Any], None]]:
    def edit(signed: Any) -> None:
        change(signed.targets[MODEL].unrecognized_fields["custom"]["sha256_chunks"])

    return {"targets": edit}


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["sha256"].pop(), "expected 4 chunk hashes"),
    (lambda c: c.update(chunk_size=4096), "expected a chunk_size >= 1048576"),
    (lambda c: c["sha256"].reverse(), "expected sha256"),
])
def test_signed_chunk_list_that_does_not_fit_is_refused(change: Callable[[dict[str, Any]], None], message: str,
                                                        chunked: Path, keydir: Path, tmp_path: Path) -> None:
    bad = resign(chunked, tmp_path / "bad.tar", keydir, edit=_chunk_edit(change))
    failed = failure(verify_bundle(bad, keydir / "root.json"))
    assert failed.number == 8 and failed.path == MODEL and message in failed.detail


# --- unpack: defence in depth when the bundle is swapped after verification ----------------------------------


def test_unpack_refuses_a_symlink_swapped_in_after_verification(bundle: Path, keydir: Path,
                                                                tmp_path: Path) -> None:
    report = verify_bundle(bundle, keydir / "root.json")
    link = tarfile.TarInfo("targets/model/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    write_members(bundle, [*read_members(bundle), (link, b"")])
    with pytest.raises(UnpackError, match=r"symbolic link.*targets/model/evil"):
        unpack_bundle(bundle, tmp_path / "release", report)
    assert not (tmp_path / "release").exists()


def test_unpack_refuses_a_longer_target_swapped_in_after_verification(bundle: Path, keydir: Path,
                                                                      tmp_path: Path) -> None:
    report = verify_bundle(bundle, keydir / "root.json")
    write_members(bundle, [(i, d + b"more" if i.name == f"targets/{MODEL}" else d) for i, d in read_members(bundle)])
    with pytest.raises(UnpackError, match=r"model/model\.safetensors: expected a member of 4096 bytes"):
        unpack_bundle(bundle, tmp_path / "release", report)
    assert not (tmp_path / "release").exists()
