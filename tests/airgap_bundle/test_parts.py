"""Split parts: every missing, reordered, swapped or damaged part is refused, naming the check and the part."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from airgap_bundle import VerificationError, verify_bundle
from airgap_bundle.parts import PartsError, join_parts, parse_size, split_bundle

PART = 7000


def _split(bundle: Path, tmp_path: Path) -> tuple[Path, dict]:
    index = split_bundle(bundle, tmp_path / "parts", PART)
    return index, json.loads(index.read_text())


def _part(bundle: Path, tmp_path: Path, n: int) -> Path:
    return tmp_path / "parts" / f"{bundle.name}.part-{n:04d}"


def test_split_join_round_trip_then_verify(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    index, data = _split(bundle, tmp_path)
    assert len(data["parts"]) == -(-bundle.stat().st_size // PART)
    assert all(p["length"] <= PART for p in data["parts"])
    joined = join_parts(index, tmp_path / "joined.tar")
    assert joined.read_bytes() == bundle.read_bytes()
    assert verify_bundle(joined, keydir / "root.json").ok


def test_damaged_part_is_named(bundle: Path, tmp_path: Path) -> None:
    index, _ = _split(bundle, tmp_path)
    second = _part(bundle, tmp_path, 2)
    raw = bytearray(second.read_bytes())
    raw[0] ^= 0xFF
    second.write_bytes(bytes(raw))
    with pytest.raises(PartsError) as info:
        join_parts(index, tmp_path / "joined.tar")
    assert info.value.check == "4 part sha256" and info.value.path == str(second)
    assert not (tmp_path / "joined.tar").exists()


def test_missing_part_file_is_named(bundle: Path, tmp_path: Path) -> None:
    index, _ = _split(bundle, tmp_path)
    _part(bundle, tmp_path, 1).unlink()
    with pytest.raises(PartsError) as info:
        join_parts(index, tmp_path / "joined.tar")
    assert info.value.check == "3 part present" and info.value.path == str(_part(bundle, tmp_path, 1))
    assert "found none" in str(info.value)


def test_part_dropped_from_the_index_is_caught(bundle: Path, tmp_path: Path) -> None:
    index, data = _split(bundle, tmp_path)
    del data["parts"][1]
    index.write_text(json.dumps(data))
    with pytest.raises(PartsError) as info:
        join_parts(index, tmp_path / "joined.tar")
    assert info.value.check == "2 part order" and info.value.path.endswith(".part-0003")
    assert "expected part 2" in str(info.value)


def test_last_part_dropped_from_the_index_is_caught(bundle: Path, tmp_path: Path) -> None:
    index, data = _split(bundle, tmp_path)
    data["parts"].pop()
    index.write_text(json.dumps(data))
    with pytest.raises(PartsError) as info:
        join_parts(index, tmp_path / "joined.tar")
    assert info.value.check == "2 part order" and "missing part" in str(info.value)
    assert info.value.path == str(index)


def test_parts_reordered_in_the_index_are_caught(bundle: Path, tmp_path: Path) -> None:
    index, data = _split(bundle, tmp_path)
    data["parts"][0], data["parts"][1] = data["parts"][1], data["parts"][0]
    index.write_text(json.dumps(data))
    with pytest.raises(PartsError) as info:
        join_parts(index, tmp_path / "joined.tar")
    assert info.value.check == "2 part order" and "reordered" in str(info.value)
    assert info.value.path == str(_part(bundle, tmp_path, 2))


def test_part_files_swapped_on_the_medium_are_caught(bundle: Path, tmp_path: Path) -> None:
    index, _ = _split(bundle, tmp_path)
    first, second = _part(bundle, tmp_path, 1), _part(bundle, tmp_path, 2)
    os.replace(first, tmp_path / "tmp-part")
    os.replace(second, first)
    os.replace(tmp_path / "tmp-part", second)
    with pytest.raises(PartsError) as info:
        join_parts(index, tmp_path / "joined.tar")
    assert info.value.check == "4 part sha256" and info.value.path == str(first)


def test_reorder_with_a_rewritten_index_still_fails_verification(bundle: Path, keydir: Path,
                                                                 tmp_path: Path) -> None:
    """The index is not signed: an attacker can make join succeed, never verification."""
    index, data = _split(bundle, tmp_path)
    first, second = _part(bundle, tmp_path, 1), _part(bundle, tmp_path, 2)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    data["parts"][0]["sha256"], data["parts"][1]["sha256"] = (hashlib.sha256(b).hexdigest(),
                                                              hashlib.sha256(a).hexdigest())
    whole = hashlib.sha256()
    for n in range(1, len(data["parts"]) + 1):
        whole.update(_part(bundle, tmp_path, n).read_bytes())
    data["sha256"] = whole.hexdigest()
    index.write_text(json.dumps(data))
    joined = join_parts(index, tmp_path / "joined.tar")
    failed = verify_bundle(joined, keydir / "root.json").first_failure()
    assert failed is not None and failed.number == 1 and failed.path


def test_index_cannot_point_outside_its_directory(bundle: Path, tmp_path: Path) -> None:
    index, data = _split(bundle, tmp_path)
    data["parts"][0]["file"] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    with pytest.raises(PartsError) as info:
        join_parts(index, tmp_path / "joined.tar")
    assert info.value.check == "1 parts index" and info.value.path == str(index)


def test_parts_errors_are_verification_errors(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match=r"check 1 parts index failed"):
        join_parts(tmp_path / "missing.parts.json", tmp_path / "joined.tar")


def test_parse_size() -> None:
    assert parse_size("4G") == 4 * 1024**3 and parse_size("512M") == 512 * 1024**2 and parse_size("10") == 10
    with pytest.raises(ValueError):
        parse_size("lots")
