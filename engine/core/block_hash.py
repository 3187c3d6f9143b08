"""Chained, salted hashes of full KV blocks for prefix caching.

hash(block i) = sha256(hash(block i-1) || token ids of block i); the chain starts from a root
derived from the cache salt, so two tenants (salts) never share a block, while equal prefixes
under the same salt do.
"""

from __future__ import annotations

import hashlib
from array import array


def root_hash(cache_salt: str | None) -> bytes:
    if cache_salt is None:
        return hashlib.sha256(b"engine-prefix-cache\x00unsalted").digest()
    return hashlib.sha256(b"engine-prefix-cache\x01" + cache_salt.encode("utf-8")).digest()


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def extend_block_hashes(
    hashes: list[bytes], token_ids: list[int], block_size: int, cache_salt: str | None
) -> None:
    """Append hashes for every full block of token_ids not yet hashed (in place)."""
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else root_hash(cache_salt)
    for i in range(len(hashes), num_full):
        parent = block_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
