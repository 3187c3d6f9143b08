"""Tokenizer, chat template sources and features, incremental detokenization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.errors import ChatTemplateError
from engine.tokenizer import ChatTemplate, IncrementalDetokenizer, Tokenizer

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok(engine_model_dir: Path) -> Tokenizer:
    return Tokenizer(engine_model_dir, (2,))


def test_chat_template_matches_transformers(tok: Tokenizer, engine_model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(engine_model_dir)
    expected = ref.apply_chat_template(MSG, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(MSG) == expected
    assert tok.encode_chat(MSG) == ref(expected, add_special_tokens=False)["input_ids"]
    assert tok.encode("Hello world") == ref("Hello world")["input_ids"]


def test_template_key_in_tokenizer_config_wins(tmp_path: Path, engine_model_dir: Path) -> None:
    shutil.copy(engine_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("JINJA FILE")
    cfg = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
           "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                            "{% if add_generation_prompt %}>{% endif %}{{ eos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer(tmp_path)
    assert t.apply_chat_template(MSG) == "<|im_start|>What is the capital of France?><|im_end|>"
    assert t.apply_chat_template(MSG, add_generation_prompt=False).endswith("?<|im_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: cfg[k] for k in ("bos_token",)}))
    assert Tokenizer(tmp_path).apply_chat_template(MSG) == "JINJA FILE"


def test_raise_exception_and_sandbox() -> None:
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('users first') }}{% endif %}ok",
                     None, None)
    assert t.render(MSG) == "ok"
    with pytest.raises(ChatTemplateError, match="users first"):
        t.render([{"role": "system", "content": "x"}])
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", None, None)
    with pytest.raises(ChatTemplateError):
        evil.render(MSG)


def test_incremental_detokenizer_never_breaks_utf8(tok: Tokenizer) -> None:
    text = "héllo 日本語 wörld 🎉 done"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    parts = []
    for i in ids:
        d.add_token(i)
        parts.append(d.take_delta(False))
    parts.append(d.take_delta(True))
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) == text == tok.decode(ids)


def test_stop_string_is_not_leaked_while_streaming(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42. STOP here please", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, ["STOP"])
    streamed = ""
    for i in ids:
        hit = d.add_token(i)
        streamed += d.take_delta(hit is not None)
        if hit:
            break
    assert d.stopped_by == "STOP"
    assert streamed == d.text == "The answer is 42. "


def test_lazy_detokenizer_keeps_text_before_a_trailing_partial_character(tok: Tokenizer) -> None:
    """Tokens queued without stop strings decode in one go; a cut-off emoji at the end must not
    hold back the text before it, and the result equals token-by-token streaming."""
    ids = tok.encode("wörld 日本 🎉", add_special_tokens=False)
    for cut in range(1, len(ids) + 1):
        lazy = IncrementalDetokenizer(tok)
        eager = IncrementalDetokenizer(tok)
        streamed = ""
        for i in ids[:cut]:
            lazy.add_token(i)
            eager.add_token(i)
            streamed += eager.take_delta(False)
        streamed += eager.take_delta(True)
        assert lazy.take_delta(True) == streamed == lazy.text
        assert "\ufffd" not in streamed and tok.decode(ids[:cut]).startswith(streamed)
