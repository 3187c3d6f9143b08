"""Sovereign paged-attention inference engine.

Public API: `LLM` (offline batch), `AsyncEngine` (online streaming), `SamplingParams`,
`EngineConfig`, output types and the exception hierarchy.
"""

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import (
    ChatTemplateError,
    DuplicateRequestError,
    EmptyPromptError,
    EngineDeadError,
    EngineError,
    InsufficientKVCacheError,
    IntegrityError,
    MissingTensorError,
    ModelLoadError,
    PromptTooLongError,
    RequestError,
    TensorShapeError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from engine.llm import LLM
from engine.outputs import RequestOutput, StreamDelta
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

__all__ = [
    "LLM",
    "AsyncEngine",
    "ChatTemplateError",
    "DuplicateRequestError",
    "EmptyPromptError",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "InsufficientKVCacheError",
    "IntegrityError",
    "MissingTensorError",
    "ModelLoadError",
    "PromptTooLongError",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
    "TensorShapeError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedArchitectureError",
]
