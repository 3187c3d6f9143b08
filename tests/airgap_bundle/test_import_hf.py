from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from airgap_bundle import ModelImportError, import_hf


def _safetensors(n: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * (4 * n)


def _hf_dir(base: Path) -> Path:
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "tokenizer.json").write_text("{}")
    (base / "model.safetensors").write_bytes(_safetensors(8))
    (base / "pytorch_model.bin").write_bytes(b"pickle")
    return base


def test_import_hf_copies_and_leaves_pickles_out(tmp_path: Path) -> None:
    out = import_hf(_hf_dir(tmp_path / "src"), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_required_file_is_a_clear_error(tmp_path: Path, missing: str) -> None:
    src = _hf_dir(tmp_path / "src")
    (src / missing).unlink()
    with pytest.raises(ModelImportError, match="expected") as info:
        import_hf(src, tmp_path / "out")
    assert missing.split(".")[0] in str(info.value) or "safetensors" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    src = _hf_dir(tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(ModelImportError, match="truncated"):
        import_hf(src, tmp_path / "out")
