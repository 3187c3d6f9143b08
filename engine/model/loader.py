"""Load a Llama-family model from a Hugging Face directory (config.json + safetensors).

Checkpoint tensors keep their Hugging Face names; the fused parameters of our model
(`PACKED_MODULES`) are filled by concatenating their shards along the output dimension, so every
error names the checkpoint tensor (e.g. `...self_attn.k_proj.weight`), never our fused name.
`load_format="dummy"` skips the checkpoint and fills every weight with small random values (for
benchmarks of a model shape without its weights; config.json is still required).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import MissingTensorError, ModelLoadError, TensorShapeError
from engine.model.config import ModelConfig, load_model_config
from engine.model.llama import PACKED_MODULES, LlamaForCausalLM

# Checkpoint tensors we know and deliberately ignore.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"expected model.safetensors (or an index) in {model_dir}; found none")
    mapping: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                mapping[name] = f
    return mapping


def _shard_rows(cfg: ModelConfig, module: str) -> int:
    return {"q_proj": cfg.q_size, "k_proj": cfg.kv_size, "v_proj": cfg.kv_size,
            "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}[module]


def checkpoint_layout(model: LlamaForCausalLM, cfg: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Our parameter name -> [(checkpoint tensor name, expected shape)], in concatenation order."""
    layout: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, param in model.named_parameters():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        prefix, _, leaf = name.rpartition(".")  # e.g. model.layers.0.self_attn.qkv_proj, weight
        owner, _, module = prefix.rpartition(".")
        shards = PACKED_MODULES.get(module)
        if shards is None:
            layout[name] = [(name, tuple(param.shape))]
            continue
        parts = []
        for shard in shards:
            rows = _shard_rows(cfg, shard)
            shape = (rows, *param.shape[1:]) if leaf == "weight" else (rows,)
            parts.append((f"{owner}.{shard}.{leaf}", shape))
        layout[name] = parts
    return layout


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, load_format: str = "auto"
) -> tuple[LlamaForCausalLM, ModelConfig]:
    cfg = load_model_config(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if load_format == "dummy":
        return _init_dummy(model, cfg, dtype, device), cfg
    if load_format != "auto":
        raise ModelLoadError(f"load_format: expected 'auto' or 'dummy'; found {load_format!r}")
    where = _checkpoint_files(model_dir)
    layout = checkpoint_layout(model, cfg)
    expected = [ckpt for parts in layout.values() for ckpt, _ in parts]
    missing = [n for n in expected if n not in where]
    if missing:
        hint = " (config says tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        raise MissingTensorError(
            f"checkpoint in {model_dir}: expected {len(expected)} tensors; "
            f"missing {len(missing)}, e.g. {missing[:5]}{hint}"
        )
    known = set(expected)
    unexpected = [
        n for n in where
        if n not in known and n != "lm_head.weight" and not n.endswith(_IGNORED_SUFFIXES)
    ]
    if unexpected:
        raise ModelLoadError(
            f"checkpoint in {model_dir}: found {len(unexpected)} tensors the {cfg.architecture} config does "
            f"not use, e.g. {unexpected[:5]}; expected none (is config.json for these weights?)"
        )
    handles: dict[Path, object] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        for name, parts in layout.items():
            tensors = []
            for ckpt, shape in parts:
                f = where[ckpt]
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt", device="cpu")
                tensor = handles[f].get_tensor(ckpt)  # type: ignore[attr-defined]
                if tuple(tensor.shape) != shape:
                    raise TensorShapeError(
                        f"tensor {ckpt}: expected shape {shape} from config.json; found {tuple(tensor.shape)}"
                    )
                tensors.append(tensor)
            joined = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            state[name] = joined.to(dtype=dtype, device=device).contiguous()
    finally:
        handles.clear()
    return _finish(model, cfg, state), cfg


def _finish(model: LlamaForCausalLM, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def _init_dummy(
    model: LlamaForCausalLM, cfg: ModelConfig, dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    """Random weights drawn on the device (no host copy of a multi-GB model); norms are ones."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(param.shape, dtype=dtype, device=device)
            state[name] = t.uniform_(-0.02, 0.02, generator=gen)
    return _finish(model, cfg, state)
