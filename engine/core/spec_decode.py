"""Prompt-lookup speculative decoding: drafts from the sequence's own tokens, no second model.

Drafting: the longest recent n-gram (MAX_NGRAM down to MIN_NGRAM tokens) that ends the sequence
(prompt + output) and occurred earlier proposes the tokens that followed its latest earlier
occurrence. Verification is one chunk of the batch (the last token + the drafts) with logits at
every position; the longest prefix of drafts equal to the model's greedy choice is accepted, plus
the model's next token (the bonus). Only sequences where greedy acceptance is exact draft: see
`can_draft`.
"""

from __future__ import annotations

from engine.core.sequence import Sequence

MAX_NGRAM = 3
MIN_NGRAM = 2  # a 1-token match drafts too often in free text (low acceptance costs verify work)
LOOKBACK = 4096  # tokens searched for an earlier occurrence (bounds the host cost on long contexts)


def can_draft(seq: Sequence) -> bool:
    """Greedy with no sampler feature that changes the argmax, no logprobs, no guided decoding,
    min_tokens reached (EOS is not masked), and one token to decode."""
    p = seq.params
    return (
        p.temperature == 0
        and p.presence_penalty == 0
        and p.frequency_penalty == 0
        and p.repetition_penalty == 1
        and p.logprobs is None
        and p.guided is None
        and seq.num_output_tokens >= p.min_tokens
        and seq.num_tokens - seq.num_computed_tokens == 1
    )


def propose(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
    if k <= 0:
        return []
    window = tokens[-LOOKBACK:]
    length = len(window)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length <= n:
            continue
        pattern = window[length - n:]
        first = pattern[0]
        best = -1
        i = 0
        end = length - n  # an occurrence must start before the suffix itself
        while True:
            try:
                i = window.index(first, i, end)
            except ValueError:
                break
            if window[i:i + n] == pattern:
                best = i
            i += 1
        if best >= 0:
            return window[best + n:best + n + k]
    return []


def draft_for(seq: Sequence, k: int) -> list[int]:
    """The drafts for seq this step (k at most, fewer near its token cap); [] if it may not draft."""
    if k <= 0 or not can_draft(seq):
        return []
    room = min(seq.max_total_tokens - seq.num_tokens, seq.params.max_tokens - seq.num_output_tokens) - 1
    if room <= 0:
        return []
    return propose(seq.all_token_ids, min(k, room))


def accept(draft: list[int] | tuple[int, ...], greedy: list[int]) -> list[int]:
    """greedy[i] is the model's choice after the chunk's i-th token (len(draft) + 1 of them): the
    accepted drafts followed by the bonus token."""
    if len(greedy) != len(draft) + 1:
        raise ValueError(f"accept: expected {len(draft) + 1} greedy tokens for {len(draft)} drafts; "
                         f"got {len(greedy)}")
    out: list[int] = []
    for d, g in zip(draft, greedy, strict=False):
        if d != g:
            break
        out.append(d)
    out.append(greedy[len(out)])
    return out
