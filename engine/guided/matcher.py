"""GuidedDecoding: one per engine. Matchers for requests, and the batched token mask of a step."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import llguidance
import torch

from engine.guided.compiler import GuidedCompiler, GuidedSpecError

log = logging.getLogger(__name__)
_BITS = torch.arange(32, dtype=torch.int32)


class GuidedDecoding:
    serial_rows = 64  # up to this many rows fill on this thread: on 2 cores 8.6% overhead vs 22% threaded (8 rows)
    """Built from the model's tokenizer.json on the first guided request (~0.2 s, once per engine).
    `matcher(spec)` validates a request's `guided` spec and returns the matcher that follows that
    sequence (the sampler keeps it, by sequence); `apply_masks` masks one step's logits for the rows that have one."""

    def __init__(self, tokenizer_json: Path | str, vocab_size: int, eos_token_ids: tuple[int, ...],
                 cache_size: int = 256) -> None:
        """``tokenizer_json``: the file, or its text. The compiler is built on the first guided request:
        an engine whose tokenizer llguidance cannot read still serves every other request."""
        self.vocab_size = vocab_size
        self._source = tokenizer_json
        self._args = (eos_token_ids, vocab_size, cache_size)
        self._compiler: GuidedCompiler | None = None
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None  # threads for batches of several rows

    @property
    def compiler(self) -> GuidedCompiler:
        with self._lock:
            if self._compiler is None:
                text = self._source.read_text() if isinstance(self._source, Path) else self._source
                try:
                    self._compiler = GuidedCompiler(text, *self._args)
                except (ValueError, RuntimeError) as exc:
                    raise GuidedSpecError(f"structured output is not available for this model: llguidance cannot "
                                          f"read its tokenizer ({exc})") from None
            return self._compiler

    def matcher(self, guided: dict[str, Any]) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the document; GuidedSpecError (a RequestError) for a bad spec."""
        return self.compiler.matcher(guided)

    def start(self, guided: dict[str, Any], output_token_ids: list[int], request_id: str) -> llguidance.LLMatcher:
        """The matcher for a sequence seen for the first time at a step. A spec that fails here (no
        request-time check ran) gives a matcher in error: it allows only EOS, so the request ends."""
        try:
            m = self.matcher(guided)
        except GuidedSpecError as exc:
            log.error("request %s: %s; ending it", request_id, exc)
            m = llguidance.LLMatcher(self.compiler.tokenizer, self.compiler.compile({"regex": "x"}))
            m.consume_token(self.compiler.eos_token_ids[0])  # drives it into its stopped state
            return m
        if output_token_ids:  # resumed after a recompute: replay what it already produced
            m.consume_tokens(list(output_token_ids))
        return m

    def validate(self, guided: dict[str, Any] | None) -> None:
        self.compiler.validate(guided)

    def apply_masks(self, logits: torch.Tensor, rows: list[int], matchers: list[llguidance.LLMatcher]) -> None:
        """In place on logits [S, V]: in each listed row every token its matcher disallows -> -inf.
        One bitmask fill for the batch (parallel, outside the GIL, when several rows), one masked_fill.
        A matcher whose document is complete allows only EOS; one in error allows only EOS too."""
        n, vocab = len(rows), logits.shape[1]
        words = (vocab + 31) // 32
        bitmask = torch.empty((n, words), dtype=torch.int32)
        if n <= self.serial_rows:  # a thread hand-off costs more than a few fills (~50 us each)
            for j, m in enumerate(matchers):
                row = bitmask[j]  # what llguidance.torch.fill_next_token_bitmask does, without importing
                m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)  # torch.compile (2.4 s at start)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(m, j) for j, m in enumerate(matchers)], bitmask.data_ptr(),
                                                   bitmask.shape[1] * 4, n)
        allowed = ((bitmask[:, :, None] >> _BITS) & 1).view(n, words * 32)[:, :vocab].bool()
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        logits[idx] = logits[idx].masked_fill(~allowed.to(logits.device), float("-inf"))


__all__ = ["GuidedDecoding", "GuidedSpecError"]
