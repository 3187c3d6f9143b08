"""Logprobs are exact: on the real model in fp32, every returned log-probability (the sampled token
and the top N alternatives) equals transformers' log_softmax of the same position's logits within
1e-4, the alternatives are the N most likely tokens in descending order, and with n > 1 each
choice's logprobs belong to its own tokens."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

TOL = 1e-4


def _reference(hf_model: torch.nn.Module, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log-probabilities of the positions that produced `output` ([len(output), V])."""
    with torch.inference_mode():
        logits = hf_model(input_ids=torch.tensor([prompt + output])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(output)]


def _check(tokens: list[int], logprobs: list[dict[int, float]] | None, reference: torch.Tensor, top: int) -> None:
    assert logprobs is not None and len(logprobs) == len(tokens) == reference.shape[0]
    for step, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        row = reference[step]
        assert next(iter(lp)) == token  # the sampled token comes first
        for tid, value in lp.items():  # every value is transformers' own, for its token
            assert value == pytest.approx(float(row[tid]), abs=TOL), (step, tid)
        items = list(lp.items())
        assert len(items) in (top, top + 1)  # top + 1 when the sampled token is not among the N
        rest = [v for _, v in items[1:]]
        assert rest == sorted(rest, reverse=True)  # the alternatives, most likely first
        values = [v for _, v in (items if len(items) == top else items[1:])]
        # the N most likely: nothing outside them beats the least of them (near-ties may swap tokens)
        nth = float(torch.topk(row, top).values[-1])
        assert min(values) == pytest.approx(nth, abs=TOL)


def test_greedy_logprobs_match_transformers_in_fp32(llm: LLM, hf_model: torch.nn.Module) -> None:
    assert llm.engine.config.dtype == "float32"
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Name three colours."}])
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True))
    assert len(out.token_ids) == 16
    reference = _reference(hf_model, prompt, out.token_ids)
    assert out.token_ids == reference.argmax(dim=-1).tolist()  # greedy: the most likely token each time
    _check(out.token_ids, out.logprobs, reference, 5)


def test_each_choice_has_the_logprobs_of_its_own_tokens(llm: LLM, hf_model: torch.nn.Module) -> None:
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a line about the sea."}])
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=12, logprobs=3, n=2, ignore_eos=True)
    first, second = llm.generate([prompt], params)
    assert (first.index, second.index) == (0, 1) and first.token_ids != second.token_ids
    for out in (first, second):  # raw-logit logprobs of the token each choice sampled, not the other's
        _check(out.token_ids, out.logprobs, _reference(hf_model, prompt, out.token_ids), 3)


def test_logprobs_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)
