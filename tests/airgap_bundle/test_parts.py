from __future__ import annotations

import json
from pathlib import Path

import pytest

from airgap_bundle import verify_bundle
from airgap_bundle.parts import PartsError, join_parts, parse_size, split_bundle


def test_split_join_round_trip_then_verify(bundle: Path, keydir: Path, tmp_path: Path) -> None:
    index = split_bundle(bundle, tmp_path / "parts", 7000)
    data = json.loads(index.read_text())
    assert len(data["parts"]) == -(-bundle.stat().st_size // 7000)
    assert all(p["length"] <= 7000 for p in data["parts"])
    joined = join_parts(index, tmp_path / "joined.tar")
    assert joined.read_bytes() == bundle.read_bytes()
    assert verify_bundle(joined, keydir / "root.json").ok


def test_damaged_part_is_named(bundle: Path, tmp_path: Path) -> None:
    index = split_bundle(bundle, tmp_path / "parts", 7000)
    second = tmp_path / "parts" / f"{bundle.name}.part-0002"
    raw = bytearray(second.read_bytes())
    raw[0] ^= 0xFF
    second.write_bytes(bytes(raw))
    with pytest.raises(PartsError, match="part-0002: expected sha256"):
        join_parts(index, tmp_path / "joined.tar")
    assert not (tmp_path / "joined.tar").exists()


def test_missing_part_is_named(bundle: Path, tmp_path: Path) -> None:
    index = split_bundle(bundle, tmp_path / "parts", 7000)
    (tmp_path / "parts" / f"{bundle.name}.part-0001").unlink()
    with pytest.raises(PartsError, match="part-0001: expected a part"):
        join_parts(index, tmp_path / "joined.tar")


def test_index_cannot_point_outside_its_directory(bundle: Path, tmp_path: Path) -> None:
    index = split_bundle(bundle, tmp_path / "parts", 7000)
    data = json.loads(index.read_text())
    data["parts"][0]["file"] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    with pytest.raises(PartsError, match="part names"):
        join_parts(index, tmp_path / "joined.tar")


def test_parse_size() -> None:
    assert parse_size("4G") == 4 * 1024**3 and parse_size("512M") == 512 * 1024**2 and parse_size("10") == 10
    with pytest.raises(ValueError):
        parse_size("lots")
