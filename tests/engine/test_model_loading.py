"""Model family coverage on tiny random checkpoints made by transformers, and load errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import MissingTensorError, TensorShapeError, UnsupportedArchitectureError
from engine.model import load_model
from engine.ops import AttentionMetadata, kv_cache_shape

transformers = pytest.importorskip("transformers")

TINY: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


def _save(tmp: Path, cls_name: str, config_cls: str, **extra: Any) -> Path:
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**TINY, **extra)
    model = getattr(transformers, cls_name)(cfg).eval()
    out = tmp / cls_name
    model.save_pretrained(out)
    return out


def _prefill_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model, cfg = load_model(model_dir, torch.float32, torch.device("cpu"))
    model.init_rotary(256, torch.device("cpu"))
    n = len(ids)
    shape = kv_cache_shape(4, 16, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), num_decode_tokens=0,
        decode_seq_lens=torch.zeros(0, dtype=torch.int32), decode_block_tables=torch.zeros(0, 1, dtype=torch.int32),
        prefill_query_start_loc=torch.tensor([0, n]), prefill_seq_lens=torch.tensor([n]),
        prefill_block_tables=torch.arange(4, dtype=torch.int32)[None], prefill_query_start_loc_host=[0, n],
        prefill_seq_lens_host=[n],
    )
    return model.compute_logits(model(ids, torch.arange(n), kv, meta))


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    ("cls_name", "config_cls", "extra"),
    [
        ("LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": False, "rope_parameters": LLAMA3_ROPE}),
        ("LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": True}),
        ("MistralForCausalLM", "MistralConfig", {"sliding_window": None}),
        ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True}),
    ],
    ids=["llama3-untied", "llama-tied", "mistral", "qwen2-bias"],
)
def test_family_matches_transformers(tmp_path: Path, cls_name: str, config_cls: str, extra: dict[str, Any]) -> None:
    model_dir = _save(tmp_path, cls_name, config_cls, **extra)
    ids = torch.randint(0, 128, (40,))
    ours = _prefill_logits(model_dir, ids)
    ref_model = getattr(transformers, cls_name).from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = ref_model(ids[None]).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, "LlamaForCausalLM", "LlamaConfig")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="found \\['GPTNeoXForCausalLM'\\]"):
        load_model(model_dir, torch.float32, torch.device("cpu"))


def test_missing_and_mismatched_tensors(tmp_path: Path) -> None:
    model_dir = _save(tmp_path, "LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=False)
    weights = load_file(model_dir / "model.safetensors")
    broken = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    save_file(broken, model_dir / "model.safetensors")
    with pytest.raises(MissingTensorError, match=r"lm_head\.weight"):
        load_model(model_dir, torch.float32, torch.device("cpu"))
    weights["model.norm.weight"] = torch.ones(65)
    save_file(weights, model_dir / "model.safetensors")
    with pytest.raises(TensorShapeError, match=r"model.norm.weight: expected shape \(64,\) .* found \(65,\)"):
        load_model(model_dir, torch.float32, torch.device("cpu"))
