"""Convert a Llama-family GGUF file into a Hugging Face model directory (safetensors).

Every tensor is dequantized with the ``gguf`` package. llama.cpp stores the q and k
projections permuted for its rotary layout, so those get the inverse permutation here.
The tokenizer goes through transformers' GGUF tokenizer conversion, which reproduces the
model's pre-tokenizer exactly. The directory is written into a staging directory and renamed
into place, so ``out`` is either absent, the old tree, or the complete new one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ModelImportError
from .fsutil import replace_dir, sha256_file, staging_dir, write_json_atomic
from .model_meta import MODEL_INFO_FILE, model_name_from_file, spdx_license

SUPPORTED_ARCHITECTURES = ("llama",)
DTYPES = ("float32", "float16", "bfloat16")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF Llama parameter name for a GGUF tensor name; None when we do not know it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def unpermute_qk(weight: Any, n_head: int) -> Any:
    """Undo llama.cpp's rotary permutation of a q or k projection.

    weight: (n_head * head_dim, in_features). llama.cpp reshaped it to
    (n_head, 2, head_dim // 2, in) and swapped axes 1 and 2; we reshape to
    (n_head, head_dim // 2, 2, in) and swap back.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"q/k projection rows {rows} not divisible by 2 * n_head = {2 * n_head}")
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _require(reader: Any, path: Path, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelImportError(path, f"expected GGUF metadata key {key!r}, found none")
    return value


def _open_reader(path: Path) -> Any:
    if not path.is_file():
        raise ModelImportError(path, "expected a GGUF file, found no such file")
    with open(path, "rb") as stream:
        magic = stream.read(4)
    if magic != b"GGUF":
        raise ModelImportError(path, f"expected GGUF magic b'GGUF' at offset 0, found {magic!r}")
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damage
        raise ModelImportError(
            path,
            f"expected a complete GGUF file (header, metadata, tensor data), found damage in its "
            f"{path.stat().st_size} bytes (truncated or corrupt?): {exc}",
        ) from exc


def read_config(reader: Any, path: Path) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from GGUF metadata."""
    arch = _require(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(path, f"expected architecture one of {SUPPORTED_ARCHITECTURES}, found {arch!r}")
    names = {t.name for t in reader.tensors}
    heads = int(_require(reader, path, f"{arch}.attention.head_count"))
    hidden = int(_require(reader, path, f"{arch}.embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(_require(reader, path, "tokenizer.ggml.tokens"))
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, path, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(reader, path, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }
    if "rope_freqs.weight" in names or _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ModelImportError(path, "expected plain RoPE, found rope scaling (not supported by this importer)")
    for key, cfg in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id"),
                     ("unknown", "unk_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[cfg] = int(value)
    return config


def _tensors(reader: Any, path: Path, config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Dequantized, renamed, un-permuted tensors as torch tensors of ``dtype``."""
    import gguf
    import numpy as np
    import torch

    torch_dtype = getattr(torch, dtype)
    out: dict[str, Any] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ModelImportError(path, f"expected only Llama tensors, found unknown tensor {tensor.name!r}")
        try:
            # dequantize returns numpy in HF layout (out_features, in_features) for 2-D weights
            weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise ModelImportError(path, f"tensor {tensor.name!r} could not be dequantized: {exc}") from exc
        expected = tuple(int(d) for d in reversed(tensor.shape))
        if tuple(weights.shape) != expected:
            raise ModelImportError(
                path, f"tensor {tensor.name!r}: expected shape {expected}, found {tuple(weights.shape)}"
            )
        if tensor.name.endswith("attn_q.weight"):
            weights = unpermute_qk(weights, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            weights = unpermute_qk(weights, config["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C")).to(torch_dtype)
    expected_count = 2 + 9 * config["num_hidden_layers"] + (0 if config["tie_word_embeddings"] else 1)
    if len(out) != expected_count:
        raise ModelImportError(path, f"expected {expected_count} tensors, found {len(out)}")
    return out


def _tokenizer_files(path: Path, stage: Path, config: dict[str, Any]) -> None:
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as exc:
        raise ModelImportError(
            path, "expected transformers (the 'import' extra) for the GGUF tokenizer conversion, found none"
        ) from exc
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    backend.save(str(stage / "tokenizer.json"))
    chat_template = tokenizer_config.get("chat_template")
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(tokenizer_config.get("add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if tokenizer_config.get(key) is not None:
            tok_cfg[key] = tokenizer_config[key]
    if chat_template:
        tok_cfg["chat_template"] = chat_template
        (stage / "chat_template.jinja").write_text(chat_template)
    write_json_atomic(stage / "tokenizer_config.json", tok_cfg)


def import_gguf(gguf: Path, out: Path, dtype: str = "float32") -> Path:
    """Convert ``gguf`` into an HF directory at ``out`` (written atomically); return ``out``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf, out = Path(gguf), Path(out)
    reader = _open_reader(gguf)
    config = read_config(reader, gguf)
    config["dtype"] = dtype
    from safetensors.torch import save_file

    with staging_dir(out) as stage:
        tensors = _tensors(reader, gguf, config, dtype)
        save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        write_json_atomic(stage / "config.json", config)
        eos = config.get("eos_token_id")
        generation: dict[str, Any] = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos,
                                      "pad_token_id": config.get("pad_token_id")}
        write_json_atomic(stage / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        _tokenizer_files(gguf, stage, config)
        digest, length = sha256_file(gguf)
        write_json_atomic(stage / MODEL_INFO_FILE, {
            "name": model_name_from_file(gguf.name),
            "license": spdx_license(str(_field(reader, "general.license", "") or "")),
            "source": {"format": "gguf", "file": gguf.name, "sha256": digest, "length": length},
            "dtype": dtype,
        })
        replace_dir(stage, out)
    return out
