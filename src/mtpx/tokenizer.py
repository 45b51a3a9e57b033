"""Tokenizer (Hugging Face `tokenizers`) and chat template (jinja2, rendered as transformers renders it)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from mtpx.config import read_json
from mtpx.errors import ModelLoadError, RequestError


class IncrementalText:
    """`Tokenizer.decode` of a growing token list (a stream's output), decoding only the tokens since the text was
    last complete (plus a few before them) instead of all of them: decoding the whole output every round costs
    O(length), 300 us at 2000 tokens with the demo's tokenizer. Returns exactly what decode(ids) returns (tested); a
    list that is not an extension of the last one starts over."""
    CONTEXT = 4  # tokens decoded again before the new ones: a decoder may treat a text's first token specially

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self._reset()

    def _reset(self) -> None:
        self._done: list[int] = []  # ids whose text is complete (no partial UTF-8 character at its end)
        self._done_text = ""  # decode(_done)
        self._start = 0  # the window decoded each call starts here
        self._head = ""  # decode(_done[_start:])

    def decode(self, ids: list[int]) -> str:
        n = len(self._done)
        if len(ids) < n or ids[:n] != self._done:
            self._reset()
        window = self.tokenizer.decode(ids[self._start:])
        if not window.startswith(self._head):  # the decoder rewrote earlier text: no shortcut
            return self.tokenizer.decode(ids)
        text = self._done_text + window[len(self._head):]
        if not window.endswith("\ufffd"):
            self._done, self._done_text = list(ids), text
            self._start = max(0, len(ids) - self.CONTEXT)
            self._head = self.tokenizer.decode(ids[self._start:])
        return text


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._texts: list[str] | None = None  # each id's text, for ids_containing
        self._containing: dict[tuple[str, ...], frozenset[int]] = {}

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ModelLoadError(f"cannot read tokenizer.json: {e}") from None
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_text(v):
            return v.get("content") if isinstance(v, dict) else v
        return cls(tok, template, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def ids_containing(self, strings: tuple[str, ...]) -> frozenset[int]:
        """The token ids whose text contains any of `strings` (DRY's sequence breakers)."""
        strings = tuple(strings)
        if strings not in self._containing:
            if self._texts is None:
                self._texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
            self._containing[strings] = frozenset(i for i, text in enumerate(self._texts)
                                                  if any(s in text for s in strings))
        return self._containing[strings]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        if not self.chat_template:
            raise RequestError("this model has no chat template (tokenizer_config.json has no 'chat_template')")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", **kwargs)
        except TemplateError as e:
            raise RequestError(f"chat template error: {e}") from None
