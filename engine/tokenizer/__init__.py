"""Tokenizer, chat template and incremental detokenizer."""

from engine.tokenizer.chat_template import ChatTemplate
from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "IncrementalDetokenizer", "Tokenizer"]
