"""The KV cache's memory budget when none is given, and the lazily committed CPU cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.model.config import load_model_config
from engine.worker import kv_budget
from engine.worker.kv_budget import (
    CPU_KV_CAP,
    CPU_KV_FRACTION,
    activation_bytes,
    gpu_kv_budget,
    lazy_zeros,
    mem_available_bytes,
)

PER_BLOCK = 2 * 30 * 16 * 3 * 64 * 4  # SmolLM2-135M, fp32, 16-token blocks


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_mem_available_is_read_from_meminfo(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   16000000 kB\n")
    assert mem_available_bytes(info) == 16000000 * 1024
    info.write_text("MemTotal: 1 kB\n")
    assert mem_available_bytes(info) is None
    assert mem_available_bytes(tmp_path / "missing") is None


def test_auto_budget_is_capped_by_what_max_num_seqs_can_use(engine_model_dir: Path) -> None:
    llm = LLM(model=engine_model_dir, max_model_len=64, max_num_seqs=4, check_integrity=True)
    stats = llm.stats()
    assert stats["num_blocks"] == 4 * 64 // 16
    assert stats["kv_cache_bytes"] == 16 * PER_BLOCK
    outs = llm.generate(["The capital of France is"] * 4, SamplingParams(temperature=0, max_tokens=8))
    assert all(len(o.token_ids) == 8 for o in outs)


def test_auto_budget_on_cpu_is_a_share_of_available_memory(engine_model_dir: Path) -> None:
    llm = LLM(model=engine_model_dir)  # max_model_len 8192 x 64 sequences: the cap binds, not the need
    stats = llm.stats()
    avail = mem_available_bytes()
    assert avail is not None
    expected = min(CPU_KV_CAP, int(avail * CPU_KV_FRACTION))
    # MemAvailable moves while the test runs (other processes); allow 5 % either way
    assert abs(stats["kv_cache_bytes"] - expected) <= 0.05 * expected
    assert stats["num_blocks"] == stats["kv_cache_bytes"] // PER_BLOCK


def test_explicit_budget_is_used_as_given(engine_model_dir: Path) -> None:
    llm = LLM(model=engine_model_dir, kv_cache_bytes=10 * PER_BLOCK + 5)
    assert llm.stats()["num_blocks"] == 10 and llm.stats()["kv_cache_bytes"] == 10 * PER_BLOCK + 5


def test_auto_budget_too_small_for_one_block_is_a_clear_error(
    engine_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_budget, "CPU_KV_CAP", 1000)
    with pytest.raises(ModelLoadError, match=r"expected at least one block \(\d+ bytes\); found 1000 \(auto"):
        LLM(model=engine_model_dir)


def test_lazy_zeros_commit_memory_only_when_written() -> None:
    shape = (4, 1024, 16, 1024)  # 256 MiB of fp32
    before = _rss_bytes()
    t = lazy_zeros(shape, torch.float32)
    assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
    assert _rss_bytes() - before < 32 * 1024**2  # nothing committed yet
    t[1, 7] = 2.5  # one 64 KiB row: writable in place, commits only its pages
    assert _rss_bytes() - before < 32 * 1024**2 + 4 * 1024**2  # a huge page at most
    assert float(t[1, 7].sum()) == 2.5 * 16 * 1024
    assert float(t[0, 0].abs().sum()) == 0.0 and float(t[3, 1023].abs().sum()) == 0.0
    assert float(t.view(-1)[: math.prod(shape) // 2].sum()) == 2.5 * 16 * 1024


def test_gpu_budget_leaves_room_for_weights_others_and_activations(engine_model_dir: Path) -> None:
    gib = 1024**3
    # an H200-sized device with 16 GiB of bf16 weights loaded and 2 GiB held by another process
    assert gpu_kv_budget(free=139 * gib - 18 * gib, total=139 * gib, activations=3 * gib) == (
        int(139 * gib * 0.9) - 18 * gib - 3 * gib)
    assert gpu_kv_budget(free=gib, total=139 * gib, activations=gib) < 0  # nothing left: no blocks
    mc = load_model_config(engine_model_dir)
    act = activation_bytes(mc, EngineConfig(model=engine_model_dir, dtype="bfloat16"), 2)
    # 2 048 tokens of hidden states and fused projections plus fp32 logits of 64 rows, doubled
    assert 2048 * (8 * 576 + 3 * 1536) * 2 < act < 256 * 1024**2
