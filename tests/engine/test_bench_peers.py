"""The peers bench (issue 19): the transformers sweep, its best-setting pick, and the llama.cpp driver
(skipped with a clear message when `make llama-cpp` has not run; one real server request when it has)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.bench import llama_cpp
from engine.bench.hf_sweep import HFSetting, pick_best, run_setting, sweep_settings
from engine.bench.peers import format_table, run_peers
from engine.bench.workload import WorkloadSpec, make_workload

MODEL = os.environ.get("SOVEREIGN_MODEL_DIR")
needs_model = pytest.mark.skipif(not MODEL, reason="SOVEREIGN_MODEL_DIR not set (run `make model`)")


def test_pick_best_takes_the_highest_median() -> None:
    runs = {"batch 8": [10.0, 30.0, 11.0], "batch 16": [20.0, 19.0, 21.0], "batch 1": [5.0, 100.0]}
    # batch 1's median is 52.5 (two runs): the highest median wins, not the highest single run
    assert pick_best(runs) == ("batch 1", 52.5)
    assert pick_best({"batch 8": [10.0, 30.0, 11.0], "batch 16": [20.0, 19.0, 21.0]}) == ("batch 16", 20.0)
    with pytest.raises(ValueError, match="at least one"):
        pick_best({})
    with pytest.raises(ValueError, match="at least one"):
        pick_best({"batch 8": []})


def test_sweep_settings_caps_and_dedupes() -> None:
    names = [s.name for s in sweep_settings([1, 8, 16, 32, 64], 32)]
    assert names == ["batch 1", "batch 8", "batch 8, length-sorted", "batch 16", "batch 16, length-sorted",
                     "batch 32", "batch 32, length-sorted"]
    with pytest.raises(ValueError, match="positive integers"):
        sweep_settings([0, 8], 32)


def test_llama_cpp_absent_is_a_clear_skip(tmp_path: Path) -> None:
    with pytest.raises(llama_cpp.LlamaCppUnavailable, match=r"not built \(run `make llama-cpp`"):
        llama_cpp.find_llama_cpp(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-server").write_bytes(b"")
    with pytest.raises(llama_cpp.LlamaCppUnavailable, match=r"smollm2-f32.gguf.*missing"):
        llama_cpp.find_llama_cpp(tmp_path)


@needs_model
def test_sorted_sweep_returns_tokens_in_workload_order() -> None:
    from engine.bench.hf_reference import load_hf_model

    assert MODEL
    ref = load_hf_model(Path(MODEL), "cpu", "float32")
    reqs = make_workload(WorkloadSpec(num_prompts=3, input_len_min=4, input_len_max=24, output_len_min=2,
                                      output_len_max=4, seed=3), ref.config.vocab_size)
    one = run_setting(ref, reqs, HFSetting(1, False), "cpu")
    srt = run_setting(ref, reqs, HFSetting(3, True), "cpu")
    assert [len(t) for t in srt["token_ids"]] == [r.output_len for r in reqs]
    # padded batches may differ from batch 1 in the last float bits; the first token of each row does not
    assert [t[0] for t in srt["token_ids"]] == [t[0] for t in one["token_ids"]]


@needs_model
def test_tiny_peers_run_is_well_formed() -> None:
    assert MODEL
    spec = WorkloadSpec(num_prompts=2, input_len_min=8, input_len_max=16, output_len_min=3, output_len_max=4)
    res = run_peers(Path(MODEL), spec, threads=1, repeats=1, batch_sizes=[1, 2], single_tokens=4,
                    single_prompt=8, llama=False, copy_bytes=1 << 24, log=lambda m: None)
    assert set(res["throughput"]) == {"transformers batch 1", "transformers batch 2",
                                      "transformers batch 2, length-sorted", "engine float32", "engine bfloat16"}
    assert all(v["median_tokens_per_s"] > 0 for v in res["throughput"].values())
    assert res["transformers_best"]["setting"] in res["throughput"]
    assert res["greedy_match_vs_transformers_batch1"][0]["engine float32"] == "2/2"
    assert res["llama_cpp_skipped"].startswith("llama.cpp peer skipped")
    assert res["seed"] == 0 and res["threads"] == 1 and len(res["commit"]) == 40
    rows = res["single_stream"]["rows"]
    assert set(rows) == {"engine float32", "engine bfloat16", "transformers batch 1 float32"}
    assert rows["engine float32"]["weight_bytes"] == 2 * rows["engine bfloat16"]["weight_bytes"]
    assert res["single_stream"]["copy_bandwidth_GBps"] > 0
    assert "engine float32" in format_table(res)


@needs_model
def test_llama_server_answers_one_request_when_built() -> None:
    try:
        build = llama_cpp.find_llama_cpp()
    except llama_cpp.LlamaCppUnavailable as e:
        pytest.skip(str(e))
    with llama_cpp.LlamaServer(build.server, build.ggufs["F32"], llama_cpp.ServerFlags(threads=1)) as srv:
        out = srv.complete([1000, 2000, 3000, 4000], 5)
        assert len(out["tokens"]) == 5 and all(isinstance(t, int) for t in out["tokens"])
    assert srv.proc.poll() is not None  # stopped on exit
