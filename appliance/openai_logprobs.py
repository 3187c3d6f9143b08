"""Log-probabilities in OpenAI's two shapes, from the engine's per-token maps.

The engine returns, for each generated token, ``{token id: logprob}`` holding the sampled token
and the ``N`` most likely tokens, all from the model's raw logits at that position (before
temperature, penalties or a response_format mask: what vLLM returns by default too). Chat answers
``{"content": [{token, logprob, bytes, top_logprobs}]}``; completions answer ``tokens``,
``token_logprobs``, ``top_logprobs`` (a map per token) and ``text_offset``.
"""

from __future__ import annotations

from typing import Any

from engine.tokenizer.tokenizer import Tokenizer


def _token(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _top(lp: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                  top_n: int) -> dict[str, Any]:
    content = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text, raw = _token(tokenizer, token_id)
        top = []
        for alt, value in _top(lp, top_n):
            alt_text, alt_raw = _token(tokenizer, alt)
            top.append({"token": alt_text, "logprob": value, "bytes": alt_raw})
        content.append({"token": text, "logprob": lp[token_id], "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                        top_n: int, offset: int) -> tuple[dict[str, Any], int]:
    """The completions shape, and the text offset after these tokens (``offset`` is where they
    start in the choice's text; a stream carries it from chunk to chunk)."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text, _ = _token(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(lp[token_id])
        tops.append({_token(tokenizer, alt)[0]: value for alt, value in _top(lp, top_n)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset
