"""Offline, batch inference: `LLM(model=DIR).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.core.choices import choice_id, choice_params
from engine.core.engine_core import EngineCore
from engine.core.sequence import Sequence as Seq
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer.tokenizer import Tokenizer


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "float32", **config: Any) -> None:
        self.config = EngineConfig(model=model, device=device, dtype=dtype, **config)
        self.engine = EngineCore(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str] | Sequence[list[int]] | Sequence[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs are in prompt order, and a prompt
        whose params ask for n > 1 choices has n consecutive outputs (``index`` 0..n-1).

        Every request is validated before any runs: a bad one raises RequestError and none run.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist: list[str | list[int]] = list(prompts)  # type: ignore[arg-type]
        if params is None:
            params = SamplingParams()
        param_list = params if isinstance(params, list) else [params] * len(plist)
        if len(param_list) != len(plist):
            raise ValueError(f"params: expected 1 or {len(plist)} SamplingParams; got {len(param_list)}")
        # one sequence per choice; choices 1..n-1 wait until choice 0's prompt is computed, then take
        # its prompt blocks from the prefix cache (engine/core/choices.py)
        groups: list[list[Seq]] = []
        for p, sp in zip(plist, param_list, strict=True):
            rid = f"llm-{next(self._ids)}"
            groups.append([self.engine.make_sequence(choice_id(rid, i), p, choice_params(sp, i) if sp.n > 1 else sp,
                                                     cache_salt=cache_salt, priority=priority)
                           for i in range(sp.n)])
        for group in groups:
            self.engine.add_sequence(group[0])
        waiting = [g for g in groups if len(g) > 1]
        while any(not s.is_finished for g in groups for s in g):
            self.engine.step()
            for g in [g for g in waiting if g[0].output_token_ids or g[0].is_finished]:
                waiting.remove(g)
                for seq in g[1:]:
                    self.engine.add_sequence(seq)
        outputs = []
        for group in groups:
            for i, seq in enumerate(group):
                out = self.engine.output(seq)
                out.request_id, out.index = group[0].request_id, i
                outputs.append(out)
        return outputs

    def chat(
        self,
        messages_list: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """One conversation (list of messages) or several; each rendered with the chat template."""
        if messages_list and isinstance(messages_list[0], dict):
            messages_list = [messages_list]  # type: ignore[list-item]
        prompts: list[str | list[int]] = [
            self.tokenizer.encode_chat(list(m), add_generation_prompt)  # type: ignore[arg-type]
            for m in messages_list
        ]
        return self.generate(prompts, params, cache_salt=cache_salt)

    def stats(self) -> dict[str, float | int]:
        return self.engine.stats()
