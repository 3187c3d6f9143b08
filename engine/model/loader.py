"""Load a Llama-family model from a Hugging Face directory (config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import MissingTensorError, ModelLoadError, TensorShapeError
from engine.model.config import ModelConfig, load_model_config
from engine.model.llama import LlamaForCausalLM

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


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device
) -> tuple[LlamaForCausalLM, ModelConfig]:
    cfg = load_model_config(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    where = _checkpoint_files(model_dir)
    expected = dict(model.named_parameters())
    tied = cfg.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    missing = [n for n in expected if n not in where]
    if missing:
        hint = " (config says tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        raise MissingTensorError(
            f"checkpoint in {model_dir}: expected {len(expected)} tensors; "
            f"missing {len(missing)}, e.g. {missing[:5]}{hint}"
        )
    unexpected = [
        n for n in where
        if n not in expected and n != "lm_head.weight" and not n.endswith(_IGNORED_SUFFIXES)
    ]
    if unexpected:
        raise ModelLoadError(
            f"checkpoint in {model_dir}: found {len(unexpected)} tensors the {cfg.architecture} config does "
            f"not use, e.g. {unexpected[:5]}; expected none (is config.json for these weights?)"
        )
    handles: dict[Path, object] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        for name, param in expected.items():
            f = where[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt", device="cpu")
            tensor = handles[f].get_tensor(name)  # type: ignore[attr-defined]
            if tuple(tensor.shape) != tuple(param.shape):
                raise TensorShapeError(
                    f"tensor {name}: expected shape {tuple(param.shape)} from config.json; "
                    f"found {tuple(tensor.shape)}"
                )
            state[name] = tensor.to(dtype=dtype, device=device)
    finally:
        handles.clear()
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model, cfg

