"""GGUF import against the real SmolLM2 file; transformers' own GGUF loading is the oracle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from airgap_bundle import ModelImportError, find_smollm2_gguf, import_gguf
from airgap_bundle.gguf_import import unpermute_qk

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's forward permutation, for the round trip."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(3 * 64 * 10, dtype=np.float32).reshape(3 * 64, 10)
    assert np.array_equal(unpermute_qk(_llama_cpp_permute(w, 3), 3), w)
    with pytest.raises(ValueError, match="divisible"):
        unpermute_qk(np.zeros((10, 4)), 3)


def test_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="no such file"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelImportError, match="magic"):
        import_gguf(tmp_path / "notgguf.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1000, 50_000_000])
def test_truncated_gguf_is_a_clear_error(tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    with open(find_smollm2_gguf(), "rb") as src:
        cut.write_bytes(src.read(keep))
    with pytest.raises(ModelImportError, match="truncated or corrupt") as info:
        import_gguf(cut, tmp_path / "out")
    assert "cut.gguf" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.staging-*"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_gguf(find_smollm2_gguf(), tmp_path_factory.mktemp("gguf") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def gguf_model() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    gguf = find_smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()


@pytest.mark.slow
def test_imported_directory_files_and_config(imported: Path) -> None:
    names = {p.name for p in imported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "airgap_model.json"} <= names
    config = json.loads((imported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 8192 and config["eos_token_id"] == 2
    tok = json.loads((imported / "tokenizer_config.json").read_text())
    assert "chat_template" in tok and "<|im_start|>" in tok["chat_template"]
    assert (tok["bos_token"], tok["eos_token"], tok["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert json.loads((imported / "generation_config.json").read_text())["eos_token_id"] == 2
    info = json.loads((imported / "airgap_model.json").read_text())
    assert info["name"] == "SmolLM2-135M-Instruct" and info["license"] == "Apache-2.0"


@pytest.mark.slow
def test_tensors_identical_to_transformers_gguf_loading(imported: Path, gguf_model: Any) -> None:
    import torch
    from safetensors.torch import load_file

    ours = load_file(str(imported / "model.safetensors"))
    theirs = {k: v for k, v in gguf_model.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.slow
def test_greedy_answer_equals_transformers_on_the_gguf_file(imported: Path, gguf_model: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    ours_tok = AutoTokenizer.from_pretrained(imported)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = ours_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = ours_tok(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref_tok(prompt, return_tensors="pt")["input_ids"])
    ours = AutoModelForCausalLM.from_pretrained(imported).eval()
    with torch.no_grad():
        out_ours = ours.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        out_ref = gguf_model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert out_ours.tolist() == out_ref.tolist()
    text = ours_tok.decode(out_ours, skip_special_tokens=False)
    assert text.startswith(ANSWER + "<|im_end|>")
