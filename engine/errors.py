"""Exceptions raised by the engine.

One root (`EngineError`), with `ModelLoadError` for everything that goes wrong while reading a
model directory and `RequestError` for a single bad request (the engine keeps serving others).
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of every error raised by the engine package."""


class ModelLoadError(EngineError):
    """A model directory could not be loaded (missing file, bad config, tensor mismatch)."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture this engine does not implement."""


class MissingTensorError(ModelLoadError):
    """The checkpoint lacks a tensor the model needs."""


class TensorShapeError(ModelLoadError):
    """A checkpoint tensor has a different shape than the config implies."""


class TokenizerError(EngineError):
    """tokenizer.json or the chat template could not be loaded or rendered."""


class ChatTemplateError(TokenizerError):
    """The chat template raised (``raise_exception``) or is missing."""


class RequestError(EngineError):
    """A single request cannot be served; other requests are unaffected."""


class PromptTooLongError(RequestError):
    """The prompt does not fit in the model context (max_model_len)."""


class InsufficientKVCacheError(RequestError):
    """The KV-cache budget is too small to hold this one sequence."""


class DuplicateRequestError(RequestError):
    """A request with the same id is already in flight."""


class EmptyPromptError(RequestError):
    """The prompt has no tokens."""


class EngineDeadError(EngineError):
    """The engine loop stopped (shut down or crashed); no request can be served."""


class IntegrityError(EngineError):
    """Engine bookkeeping (block ref counts, free list, hash map) is inconsistent."""
