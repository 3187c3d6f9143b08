"""Tokenizer over tokenizer.json (the `tokenizers` library) plus the model's chat template."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from engine.errors import ChatTemplateError, TokenizerError
from engine.tokenizer.chat_template import ChatTemplate

# Past this many characters a text is encoded through encode_batch, which lets go of the GIL while
# Rust works (encode holds it throughout: 0.64 s for a 1 MB prompt, during which no other thread of
# the process, the gateway's event loop included, runs). Below it encode is quicker.
GIL_FREE_CHARS = 4096


def _encode(tok: _HFTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > GIL_FREE_CHARS:
        return list(tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
    return list(tok.encode(text, add_special_tokens=add_special_tokens).ids)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: each byte is shown as one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_UNICODE_TO_BYTE = _byte_level_alphabet()


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts.
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") is not None else None
    return str(value) if value is not None else None


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template key first, then chat_template.jinja."""
    raw = config.get("chat_template")
    if isinstance(raw, list):  # [{"name": "default", "template": ...}, ...]
        named = {str(t.get("name")): str(t.get("template")) for t in raw if isinstance(t, dict)}
        raw = named.get("default") or next(iter(named.values()), None)
    if isinstance(raw, str) and raw:
        return raw
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return None


class Tokenizer:
    def __init__(self, model_dir: str | Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"expected {path}; found no tokenizer.json in {model_dir}")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos = list(eos_token_ids)
        own_eos = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if own_eos is not None and own_eos not in eos:
            eos.append(own_eos)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        self.eos_token_id: int | None = eos[0] if eos else None
        source = _chat_template_source(model_dir, config)
        self._chat = ChatTemplate(source, self.bos_token, self.eos_token) if source else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # For encode_chat: the added tokens' texts (control tokens) and a second tokenizer that
        # encodes their text as ordinary characters (used for message contents).
        self._added = {tok.content: tid for tid, tok in self._tok.get_added_tokens_decoder().items()}
        by_length = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")" if by_length else "(?!)")
        self._plain = _HFTokenizer.from_file(str(path))
        self._plain.encode_special_tokens = True
        decoder = (json.loads(self._tok.to_str()).get("decoder") or {})
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
        self._byte_level = "ByteLevel" in kinds
        self._token_bytes: dict[int, bytes] = {}

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _encode(self._tok, text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level token may hold part of a UTF-8 character):
        what OpenAI's logprobs report as ``bytes``. Cached per id."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        if piece in self._added:  # a control token: its text
            out = piece.encode()
        elif self._byte_level:
            out = bytes(_UNICODE_TO_BYTE.get(ch, 0x3F) for ch in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            out = bytes([int(piece[3:5], 16)])
        else:  # sentencepiece: U+2581 marks a space
            out = piece.replace("\u2581", " ").encode()
        self._token_bytes[token_id] = out
        return out

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Render messages to prompt text (or token ids with tokenize=True, no extra specials)."""
        if self._chat is None:
            raise ChatTemplateError("model has no chat template: expected tokenizer_config.json "
                                    "'chat_template' or chat_template.jinja; found neither")
        text = self._chat.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat whose control tokens come only from the template.

        Message contents are text: ``<|im_start|>`` typed by a user is encoded as the characters
        it is made of, never as the control token. For contents without such text the ids are
        exactly ``encode(apply_chat_template(...), add_special_tokens=False)``: the rendered
        prompt is cut at the added tokens the template wrote (as ``encode`` cuts it at every
        added token) and each piece between them is encoded alone, with added-token text in it
        read as plain text.
        """
        if self._chat is None:
            raise ChatTemplateError("model has no chat template: expected tokenizer_config.json "
                                    "'chat_template' or chat_template.jinja; found neither")
        # Each content is wrapped in markers no client can forge (a fresh nonce per call), so the
        # rendered text says which characters came from a message and which from the template.
        nonce = secrets.token_hex(8)
        start, end = f"\ue000{nonce}\ue001", f"\ue001{nonce}\ue000"
        marked = [
            {**m, "content": f"{start}{m['content']}{end}"} if isinstance(m.get("content"), str) else m
            for m in messages
        ]
        rendered = self._chat.render(marked, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        piece: list[str] = []  # text since the last control token
        for i, part in enumerate(rendered.split(start)):
            content, found, template = part.rpartition(end) if i else ("", "", part)
            if (i and not found) or end in content or "\ue000" in template or "\ue001" in template:
                raise ChatTemplateError("chat template does not copy message contents verbatim; "
                                        "expected each content once, as given")
            piece.append(content)
            for j, text in enumerate(self._added_re.split(template)):
                if j % 2:  # a control token the template wrote
                    ids += self._encode_plain("".join(piece))
                    ids.append(self._added[text])
                    piece = []
                else:
                    piece.append(text)
        return ids + self._encode_plain("".join(piece))

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of text in which added-token text (``<|im_start|>``) is read as plain characters."""
        return _encode(self._plain, text, False) if text else []
