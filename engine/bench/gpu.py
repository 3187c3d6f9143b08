"""`bench --device cuda`: a Llama-3.1-8B-shaped model with random bf16 weights (nothing downloaded).

Reports offline output tokens/s on 256 requests with prompt and output lengths uniform in
[100, 1024], and single-stream decode tokens/s against the roofline: weight bytes read per token
divided by the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.bench.offline import exact_length_params, run_offline
from engine.bench.workload import BenchRequest, WorkloadSpec, make_workload
from engine.model.config import ModelConfig

LLAMA_3_1_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
}

GPU_WORKLOAD = WorkloadSpec(num_prompts=256, input_len_min=100, input_len_max=1024,
                            output_len_min=100, output_len_max=1024, seed=0)


def write_synthetic_model_dir(path: Path, config: dict[str, Any]) -> Path:
    """config.json plus a word-level tokenizer.json with one token per id ("t<id>")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i}": i for i in range(int(config["vocab_size"]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 4 * 1024**3, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the buffers back: the KV cache is sized from the free memory
    return 2 * nbytes * iters / seconds


def weight_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the weights one decode step must read: every layer, the final norm and the LM head
    (the input embedding contributes one row per token, which is negligible)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * inter + 2 * h
    if cfg.qkv_bias:
        per_layer += cfg.q_size + 2 * cfg.kv_size
    elements = cfg.num_layers * per_layer + h + cfg.vocab_size * h
    return elements * dtype.itemsize


def single_stream_decode(llm: Any, prompt_len: int = 128, output_len: int = 512) -> dict[str, float]:
    """Decode tokens/s of one sequence, timed from its first token to its last (host work included)."""
    core = llm.engine
    vocab = core.model_config.vocab_size
    req = BenchRequest([(1000 + i) % vocab for i in range(prompt_len)], output_len)
    seq = core.add_request("single-stream", req.prompt_ids, exact_length_params(req))
    while seq.num_output_tokens == 0:
        core.step()
    _sync(core.runner.device)
    t0 = time.perf_counter()
    first = seq.num_output_tokens
    while not seq.is_finished:
        core.step()
    _sync(core.runner.device)
    seconds = time.perf_counter() - t0
    return {"tokens": seq.num_output_tokens - first, "seconds": seconds,
            "tokens_per_s": (seq.num_output_tokens - first) / seconds}


def run_gpu_bench(
    device: str = "cuda", num_prompts: int | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The issue's GPU benchmark: Llama-3.1-8B shape, bf16, 256 requests, lengths U[100, 1024]."""
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch {torch.__version__}")
    spec = GPU_WORKLOAD if num_prompts is None else WorkloadSpec(**{**GPU_WORKLOAD.__dict__,
                                                                   "num_prompts": num_prompts})
    name = torch.cuda.get_device_name(torch.device(device))

    def progress(partial: dict[str, Any]) -> None:
        if on_progress is not None:
            on_progress({**partial, "device": name})

    result = run_shape_bench(LLAMA_3_1_8B, spec, device=device, dtype="bfloat16", on_progress=progress)
    result["device"] = name
    return result


def run_shape_bench(
    config: dict[str, Any], spec: WorkloadSpec, device: str, dtype: str, copy_bytes: int = 4 * 1024**3,
    single_stream_tokens: int = 512, max_num_seqs: int = 256,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A model of config's shape with random weights: offline throughput on spec and single-stream
    decode against the roofline. Runs anywhere (tests use a tiny shape on CPU).

    The KV cache is sized by the engine (kv_cache_bytes=None): on CUDA what the device has left
    after the weights, at most max_num_seqs full-length sequences, so a smaller or shared device
    preempts instead of failing to allocate. `on_progress` gets the results so far after each phase
    (a run cut short still reports what it measured)."""
    from engine import LLM

    dev = torch.device(device)
    bw = copy_bandwidth(dev, copy_bytes)
    max_len = spec.input_len_max + spec.output_len_max
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_synthetic_model_dir(Path(tmp) / "shape", config)
        t0 = time.perf_counter()
        llm = LLM(model=model_dir, device=device, dtype=dtype, load_format="dummy",
                  max_model_len=max(max_len, 128 + single_stream_tokens), max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=8192)
        init_s = time.perf_counter() - t0
    runner = llm.engine.runner
    wbytes = weight_bytes_per_token(llm.engine.model_config, llm.config.torch_dtype)
    roofline = bw / wbytes
    result: dict[str, Any] = {
        "device": device,
        "workload": spec.describe(),
        "init_seconds": init_s,
        "attention_backend": runner.model.backend.name,
        "cuda_graphs": runner.graphs is not None,
        "kv_cache_bytes": runner.kv_cache_bytes,
        "kv_cache_tokens": runner.num_blocks * llm.config.block_size,
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_GB_per_token": wbytes / 1e9,
        "roofline_tokens_per_s": roofline,
    }
    if on_progress is not None:
        on_progress(dict(result))
    single = single_stream_decode(llm, output_len=single_stream_tokens)
    result.update(single_stream_tokens_per_s=single["tokens_per_s"],
                  fraction_of_roofline=single["tokens_per_s"] / roofline)
    if on_progress is not None:
        on_progress(dict(result))
    preempted = llm.engine.scheduler.num_preemptions
    offline = run_offline(llm, make_workload(spec, config["vocab_size"]))
    result.update(
        offline_output_tokens=offline.output_tokens,
        offline_seconds=offline.seconds,
        offline_output_tokens_per_s=offline.output_tokens / offline.seconds,
        offline_steps=offline.num_steps,
        offline_preemptions=llm.engine.scheduler.num_preemptions - preempted,
    )
    return result
