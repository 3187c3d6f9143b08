"""Model definitions and loading."""

from engine.model.config import ModelConfig, RopeConfig, load_model_config
from engine.model.llama import LlamaForCausalLM
from engine.model.loader import load_model

__all__ = ["LlamaForCausalLM", "ModelConfig", "RopeConfig", "load_model", "load_model_config"]
