"""n > 1: one request's choices as sibling sequences that share the prompt's KV blocks.

Choice 0 is admitted first. Once its prompt is computed (its first token sampled, its full prompt
blocks registered in the prefix cache by that step), choices 1..n-1 are admitted with the same
prompt, cache salt, tenant, priority and deadline: every full prompt block comes from the cache,
refcounted and never written again, and only the last partial block (< block_size tokens) is
recomputed per choice. vLLM forks the sequence instead and copies the partial block on write; the
difference is those few recomputed tokens per choice, and one step of delay for choices 1..n-1.
With prefix caching off the choices still run, each computing the prompt itself.

Each choice samples on its own: with a ``seed``, choice i draws from a seed derived from (seed, i),
so a seeded request is reproducible as a whole and its choices differ; choice 0 keeps the seed, so
n = 1 and choice 0 of n > 1 agree.
"""

from __future__ import annotations

import dataclasses

from engine.errors import RequestError
from engine.sampling_params import SamplingParams

SEPARATOR = "\x00"  # internal choice ids are f"{request_id}\x00{i}"; no caller's id may hold it
_GOLDEN = 0x9E3779B97F4A7C15  # spreads derived seeds over the whole range


def check_request_id(request_id: str) -> None:
    if SEPARATOR in request_id:
        raise RequestError(f"request id {request_id!r} holds a NUL character; expected printable text")


def choice_id(request_id: str, index: int) -> str:
    return request_id if index == 0 else f"{request_id}{SEPARATOR}{index}"


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling parameters of one choice: n = 1, and its own seed when the request has one."""
    seed = params.seed
    if seed is not None and index:
        seed = (seed + index * _GOLDEN) % 2**63
    return dataclasses.replace(params, n=1, seed=seed)
