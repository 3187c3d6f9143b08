"""Compile and validate `guided` specs into llguidance grammars, cached by spec."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

from engine.errors import RequestError

# Compact JSON (", " and ": " separators, no free whitespace): a small model given free whitespace
# can spend its whole budget on newlines; this form is what json.dumps writes and always parses.
_JSON_OPTIONS: Any = {
    "item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False,
}
MAX_SPEC_CHARS = 200_000


class GuidedSpecError(RequestError):
    """A `guided` spec (JSON schema, regex or grammar) cannot be compiled."""


def grammar_for_spec(guided: dict[str, Any]) -> str:
    """The llguidance grammar for one spec; raises GuidedSpecError naming what was wrong."""
    if not isinstance(guided, dict) or len(guided) != 1:
        raise GuidedSpecError(f"guided must be a dict with exactly one key; got {guided!r:.200}")
    kind, value = next(iter(guided.items()))
    try:
        if kind == "json_object":
            if value is not True:
                raise GuidedSpecError(f"guided.json_object must be true; got {value!r:.100}")
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "json_schema":
            if not isinstance(value, dict):
                raise GuidedSpecError(f"guided.json_schema must be a JSON schema object; got {type(value).__name__}")
            return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=_JSON_OPTIONS)
        if kind == "regex":
            if not isinstance(value, str) or not value:
                raise GuidedSpecError(f"guided.regex must be a non-empty pattern string; got {value!r:.100}")
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "grammar":
            if not isinstance(value, str) or not value.strip():
                raise GuidedSpecError(f"guided.grammar must be non-empty Lark or GBNF text; got {value!r:.100}")
            lark = gbnf_to_lark(value) if "::=" in value else value
            return llguidance.LLMatcher.grammar_from_lark(lark)
    except GuidedSpecError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise GuidedSpecError(f"guided.{kind} is invalid: {exc}") from None
    raise GuidedSpecError(f"guided has unknown key {kind!r}; expected json_object, json_schema, regex or grammar")


def _cache_key(guided: dict[str, Any]) -> str:
    try:
        key = json.dumps(guided, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise GuidedSpecError(f"guided must be JSON-serialisable: {exc}") from None
    if len(key) > MAX_SPEC_CHARS:
        raise GuidedSpecError(f"guided spec has {len(key)} characters; at most {MAX_SPEC_CHARS} allowed")
    return key


class GuidedCompiler:
    """Validated grammars for one tokenizer, in a bounded LRU keyed by the spec's canonical JSON.

    tokenizer_json: the text of the model's tokenizer.json (HF `tokenizers`);
    eos_token_ids: what the matcher allows once the output is complete."""

    def __init__(self, tokenizer_json: str, eos_token_ids: tuple[int, ...], vocab_size: int | None = None,
                 cache_size: int = 256) -> None:
        if not eos_token_ids:
            raise ValueError("guided decoding needs at least one EOS token id")
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.eos_token_ids = eos_token_ids
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # validate() runs on request threads, matchers on the engine thread

    def compile(self, guided: dict[str, Any]) -> str:
        """The validated grammar for a spec (cached); raises GuidedSpecError for a bad spec."""
        key = _cache_key(guided)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = grammar_for_spec(guided)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            kind = next(iter(guided))
            raise GuidedSpecError(f"guided.{kind} is invalid: {'; '.join(messages)[:500]}")
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def validate(self, guided: dict[str, Any] | None) -> None:
        """Request-time check (raises GuidedSpecError); warms the cache for the step."""
        if guided is not None:
            self.compile(guided)

    def matcher(self, guided: dict[str, Any]) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self.tokenizer, self.compile(guided))
        if m.is_error():
            raise GuidedSpecError(f"guided.{next(iter(guided))} is invalid: {m.get_error()}")
        return m

    def cache_len(self) -> int:
        return len(self._cache)
