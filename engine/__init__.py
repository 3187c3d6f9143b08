"""Sovereign paged-attention inference engine.

Public API: `LLM` (offline batch), `AsyncEngine` (online streaming), `SamplingParams`,
`EngineConfig`, output types and the exception hierarchy. `RemoteEngine` (AsyncEngine's interface
over a node server's mutual-TLS API) is imported on first use, so `import engine` does not pull
in httpx and pydantic.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from engine.remote import RemoteEngine


def __getattr__(name: str) -> Any:
    if name == "RemoteEngine":
        from engine.remote import RemoteEngine

        return RemoteEngine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


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
    "RemoteEngine",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
    "TensorShapeError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedArchitectureError",
]
