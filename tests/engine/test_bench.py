"""Benchmark plumbing: seeded workloads, percentiles, the shape bench (tiny, on CPU), the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.bench import WorkloadSpec, make_workload, percentile
from engine.bench.gpu import run_shape_bench
from engine.bench.online import arrival_offsets
from engine.cli import app

TINY = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 2,
}


def test_workload_is_seeded_and_in_range() -> None:
    spec = WorkloadSpec(num_prompts=20, input_len_min=3, input_len_max=9, output_len_min=2, output_len_max=5, seed=4)
    a, b = make_workload(spec, 1000), make_workload(spec, 1000)
    assert a == b and a != make_workload(WorkloadSpec(**{**spec.__dict__, "seed": 5}), 1000)
    assert all(3 <= len(r.prompt_ids) <= 9 and 2 <= r.output_len <= 5 for r in a)
    assert all(256 <= t < 1000 for r in a for t in r.prompt_ids)
    with pytest.raises(ValueError, match="input lengths"):
        WorkloadSpec(input_len_min=10, input_len_max=5)


def test_percentile_and_arrivals() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
    assert arrival_offsets(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    gaps = arrival_offsets(2000, 4.0, 0)
    assert gaps == sorted(gaps) and 400 < gaps[-1] < 600  # ~2000 / 4 req/s


def test_shape_bench_on_cpu_with_a_tiny_random_model() -> None:
    spec = WorkloadSpec(num_prompts=4, input_len_min=5, input_len_max=20, output_len_min=3, output_len_max=8)
    out = run_shape_bench(TINY, spec, device="cpu", dtype="float32", copy_bytes=1 << 24, single_stream_tokens=16,
                          max_num_seqs=4)
    assert out["offline_output_tokens"] == sum(r.output_len for r in make_workload(spec, 300))
    assert out["single_stream_tokens_per_s"] > 0 and out["roofline_tokens_per_s"] > 0
    assert out["cuda_graphs"] is False


@pytest.mark.slow
def test_cli_bench_json(engine_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(engine_model_dir), "--num-prompts", "3", "--input-len-max", "24",
        "--max-tokens", "4", "--no-compare-transformers", "--rates", "inf", "--online-prompts", "2",
        "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["offline"]["engine_tokens_per_s"] > 0 and "hf_tokens_per_s" not in data["offline"]
    assert data["online"][0]["requests"] == 2 and data["online"][0]["ttft_p50_ms"] > 0
