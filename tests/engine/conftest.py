"""Engine test fixtures: the real SmolLM2 model, loaded once per session (ours and transformers)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLM


@pytest.fixture(scope="session")
def engine_model_dir(request: pytest.FixtureRequest) -> Path:
    """Our import of the real SmolLM2 GGUF (the shared `model_dir` fixture), unless overridden."""
    override = os.environ.get("ENGINE_TEST_MODEL_DIR")
    if override:
        return Path(override)
    return Path(request.getfixturevalue("model_dir"))


@pytest.fixture(scope="session")
def llm(engine_model_dir: Path) -> LLM:
    return LLM(model=engine_model_dir, check_integrity=True, max_num_batched_tokens=512)


@pytest.fixture(scope="session")
def hf_model(engine_model_dir: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(engine_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_model: torch.nn.Module) -> Callable[[list[int], int], list[int]]:
    """Greedy continuation by transformers (no eos stop), the correctness oracle."""

    def run(prompt_ids: list[int], max_new: int) -> list[int]:
        # a plain argmax loop with HF's KV cache: generate() with min_new_tokens would suppress EOS
        ids = torch.tensor([prompt_ids])
        past = None
        out: list[int] = []
        with torch.inference_mode():
            for _ in range(max_new):
                res = hf_model(input_ids=ids, cache=past, use_cache=True)
                past = res.cache
                nxt = int(res.logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.tensor([[nxt]])
        return out

    return run
