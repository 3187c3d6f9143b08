"""The synchronous engine: add requests, then `step()` = schedule -> run -> postprocess."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.scheduler import ScheduledSeq, Scheduler
from engine.core.scheduling_policy import SchedulingPolicy
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.spec_decode import accept
from engine.errors import (
    DuplicateRequestError,
    EmptyPromptError,
    InsufficientKVCacheError,
    PromptTooLongError,
    RequestError,
)
from engine.guided import GuidedDecoding, GuidedSpecError
from engine.outputs import RequestOutput, StreamDelta
from engine.sampling_params import SamplingParams
from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.tokenizer import Tokenizer
from engine.worker.model_runner import ModelRunner
from engine.worker.sampler import Sampler


class EngineCore:
    """Not thread-safe: one thread drives it (LLM directly, AsyncEngine from its loop thread)."""

    def __init__(self, config: EngineConfig, scheduling: SchedulingPolicy | None = None) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.tokenizer = Tokenizer(config.model_path, self.model_config.eos_token_ids)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        scheduling = scheduling or SchedulingPolicy(mode=config.scheduling, max_wait_s=config.max_wait_s)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, scheduling,
                                   speculative_tokens=config.speculative_tokens)
        self.guided = GuidedDecoding(config.model_path / "tokenizer.json", self.model_config.vocab_size,
                                     self.eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids, self.guided)
        self.requests: dict[str, Sequence] = {}
        self.num_steps = 0
        self.num_prompt_tokens = 0  # of admitted requests (cumulative)
        self.num_generation_tokens = 0  # sampled tokens (cumulative)
        self.num_draft_tokens = 0  # speculative decoding: tokens proposed, accepted, and drafted chunks
        self.num_accepted_tokens = 0
        self.num_spec_chunks = 0

    # ---- requests -----------------------------------------------------------------------
    def make_sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        cache_salt: str | None = None,
        priority: int = 0,
        deadline: float | None = None,
        tenant: str | None = None,
        tpot_target_s: float | None = None,
    ) -> Sequence:
        """Tokenize and validate; raises RequestError for a request that can never run."""
        if deadline is not None and not math.isfinite(deadline):
            raise RequestError(f"request {request_id}: deadline must be a finite time.time() value; got {deadline}")
        if tpot_target_s is not None and not (math.isfinite(tpot_target_s) and tpot_target_s > 0):
            raise RequestError(
                f"request {request_id}: tpot_target_s must be a number of seconds > 0; got {tpot_target_s}"
            )
        if tenant is not None and not 1 <= len(tenant) <= 256:
            raise RequestError(f"request {request_id}: tenant must be 1 to 256 characters; got {len(tenant)}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EmptyPromptError(f"request {request_id}: prompt has 0 tokens; expected at least 1")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"request {request_id}: token ids must be in [0, {vocab}); found {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"request {request_id}: prompt has {len(ids)} tokens; max_model_len {self.max_model_len} "
                f"allows at most {self.max_model_len - 1}"
            )
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if total > capacity:
            raise InsufficientKVCacheError(
                f"request {request_id}: needs KV for {total} tokens (prompt {len(ids)} + max_tokens "
                f"{params.max_tokens}); the KV cache holds {capacity} tokens (kv_cache_bytes="
                f"{self.runner.kv_cache_bytes})"
            )
        if params.guided is not None:  # compiled and checked now: a bad spec is this request's error
            try:
                self.guided.validate(params.guided)
            except RequestError as exc:
                raise GuidedSpecError(f"request {request_id}: {exc}") from None
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(params.seed)
        return Sequence(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop_strings),
            cache_salt=cache_salt,
            priority=priority,
            deadline=deadline,
            tenant=tenant,
            tpot_target_s=tpot_target_s,
            max_total_tokens=total,
            logprobs=[] if params.logprobs is not None else None,
            generator=gen,
        )

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise DuplicateRequestError(f"request id {seq.request_id!r} is already in flight")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        self.num_prompt_tokens += seq.num_prompt_tokens

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    **kwargs: object) -> Sequence:
        seq = self.make_sequence(request_id, prompt, params, **kwargs)  # type: ignore[arg-type]
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request now (reason "abort"); its blocks are freed immediately."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        self._finish(seq, "abort")
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One iteration. Returns sequences that produced a token or finished this step."""
        expired = self._expire(self.scheduler.expire())
        out = self.scheduler.schedule()
        if out.is_empty:
            return expired
        started = time.perf_counter()
        logits, sampled, verified = self.runner.execute(out.scheduled)
        for item in out.scheduled:
            if not item.draft:
                item.seq.num_computed_tokens += item.num_new_tokens
        results = self.sampler(logits, [s.seq for s in sampled], scratch=True) if sampled else []
        self.scheduler.cost.observe(out.num_batched_tokens, time.perf_counter() - started)
        touched: list[Sequence] = [self._apply_verified(item, greedy) for item, greedy in verified]
        self.num_generation_tokens += len(results)
        for item, res in zip(sampled, results, strict=True):
            seq = item.seq
            seq.output_token_ids.append(res.token_id)
            if seq.logprobs is not None and res.logprobs is not None:
                seq.logprobs.append(res.logprobs)
            self._check_stop(seq, res.token_id)
            touched.append(seq)
        for item in out.scheduled:  # finished ones too: their prefix serves later turns
            self.block_manager.cache_computed_blocks(item.seq)
        for seq in touched:
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
                self.scheduler.remove(seq)
        self.num_steps += 1
        if self.config.check_integrity:
            self.check_integrity()
        return expired + touched

    def _apply_verified(self, item: ScheduledSeq, greedy: list[int]) -> Sequence:
        """Take a drafted chunk's accepted drafts and bonus token one at a time through the stop
        check; the KV of rejected drafts is rolled back (num_computed_tokens stops before them, so
        their slots are rewritten and no block holding them is ever cached)."""
        seq = item.seq
        tokens = accept(item.draft, greedy)
        self.num_draft_tokens += len(item.draft)
        self.num_accepted_tokens += len(tokens) - 1
        self.num_spec_chunks += 1
        computed = seq.num_computed_tokens + len(tokens)  # the last token + the accepted drafts
        for token in tokens:
            seq.output_token_ids.append(token)
            self.num_generation_tokens += 1
            self._check_stop(seq, token)
            if seq.is_finished:
                break
        seq.num_computed_tokens = min(computed, seq.num_tokens)
        return seq

    def _expire(self, seqs: list[Sequence]) -> list[Sequence]:
        """End requests the scheduler took out at their deadline (their blocks are already free)."""
        for seq in seqs:
            self.requests.pop(seq.request_id, None)
            self._finish(seq, "deadline")
        return seqs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        stop_string = seq.detokenizer.add_token(token)
        min_ok = seq.num_output_tokens >= p.min_tokens
        if min_ok and not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, "stop", token)
        elif min_ok and p.stop_token_ids and token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif stop_string is not None:
            self._finish(seq, "stop", stop_string)
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= seq.max_total_tokens:
            self._finish(seq, "length")

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use are untouched); for benchmarks and tests."""
        self.block_manager.reset_prefix_cache()

    def check_integrity(self) -> None:
        self.block_manager.check_integrity(self.scheduler.live_sequences())

    # ---- outputs ------------------------------------------------------------------------
    @staticmethod
    def delta(seq: Sequence) -> StreamDelta:
        """What is new for seq since the last delta (text held back until stable)."""
        return StreamDelta(
            request_id=seq.request_id,
            text=seq.detokenizer.take_delta(seq.is_finished),
            token_ids=seq.take_new_tokens(),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            logprobs=seq.take_new_logprobs(),
            num_cached_tokens=seq.num_cached_tokens,
        )

    @staticmethod
    def output(seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=list(seq.prompt_token_ids),
            text=seq.detokenizer.text,
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=seq.logprobs,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def stats(self) -> dict[str, Any]:
        """Numbers, plus three maps: preemptions by reason, deadline misses by the state the request
        was in, and tokens served per named tenant (computed prompt tokens + generated tokens)."""
        bm = self.block_manager
        sched = self.scheduler
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage(),
            "num_blocks": bm.num_blocks,
            "max_model_len": self.max_model_len,
            "kv_cache_bytes": self.runner.kv_cache_bytes,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "num_preemptions": sched.num_preemptions,
            "preemptions_by_reason": dict(sched.preemptions_by_reason),
            "num_deadline_misses": sched.num_deadline_misses,
            "deadline_misses_by_state": dict(sched.deadline_misses_by_state),
            "tenant_served_tokens": {t: n for t, n in sched.fair.served.items() if t},
            "num_steps": self.num_steps,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generation_tokens,
            "spec_draft_tokens": self.num_draft_tokens,
            "spec_accepted_tokens": self.num_accepted_tokens,
            "spec_chunks": self.num_spec_chunks,
            "time": time.time(),
        }
