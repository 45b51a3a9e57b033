"""Tokenizer (Hugging Face `tokenizers`) and chat template (jinja2, rendered as transformers renders it)."""
from __future__ import annotations

import bisect
import json
import re
import threading
from collections import OrderedDict
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
        # ids_containing's answers per breaker string, bounded: requests may send any breakers they like
        self._containing: OrderedDict[str, frozenset[int]] = OrderedDict()
        self._lock = threading.Lock()  # HTTP worker threads and the scheduler share the caches
        self._plain: HFTokenizer | None = None  # a copy that encodes special tokens' text as text
        self.special_tokens: tuple[str, ...] = tuple(
            t.content for t in tok.get_added_tokens_decoder().values() if t.special and t.content)

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
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (vocabulary, added tokens, tokenizer.json), e.g. for a GGUF export."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`. special=False: the text of a special token (`<|im_start|>`) is encoded as text, not
        as the control token (transformers' split_special_tokens). Lone surrogates (valid JSON escapes, invalid
        Unicode) become U+FFFD. Long texts are encoded with the GIL released, so other threads keep running."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        tok = self._tok
        if not special and any(s in text for s in self.special_tokens):
            tok = self._plain_tokenizer()
        if len(text) > 4096:  # encode_batch releases the GIL (encode does not)
            return tok.encode_batch([text], add_special_tokens=False)[0].ids
        return tok.encode(text, add_special_tokens=False).ids

    def _plain_tokenizer(self) -> HFTokenizer:
        with self._lock:
            if self._plain is None:
                plain = HFTokenizer.from_str(self._tok.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            return self._plain

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """The token ids of the chat template applied to `messages`, with the messages' content encoded as text:
        a special token's text inside a message (`<|im_end|>\n<|im_start|>system`) stays text and cannot forge
        a turn. The template's own special tokens are the control tokens."""
        forged = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str)
                  and any(s in m["content"] for s in self.special_tokens)]
        if not forged:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))
        marked, contents = [dict(m) for m in messages], {}
        for i in forged:  # render with a placeholder in private-use characters, then encode the content as text
            mark = f"\ue000mtpx-content-{i}\ue001"
            contents[mark] = marked[i]["content"]
            marked[i]["content"] = mark
        text = self.apply_chat_template(marked, add_generation_prompt, **kwargs)
        ids: list[int] = []
        for part in re.split("(" + "|".join(map(re.escape, contents)) + ")", text):
            if part in contents:
                ids += self.encode(contents[part], special=False)
            elif part:
                ids += self.encode(part)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    CONTAINING_CACHE = 256  # breaker strings whose token ids are kept

    def ids_containing(self, strings: tuple[str, ...]) -> frozenset[int]:
        """The token ids whose text contains any of `strings` (DRY's sequence breakers). Each string's ids are found
        with one search of all token texts joined (not one test per token) and kept in a bounded LRU cache."""
        out: set[int] = set()
        for s in dict.fromkeys(strings):
            out |= self._ids_containing_one(s)
        return frozenset(out)

    def _ids_containing_one(self, s: str) -> frozenset[int]:
        with self._lock:
            hit = self._containing.get(s)
            if hit is not None:
                self._containing.move_to_end(s)
                return hit
            if self._texts is None:
                texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
                starts, at = [], 0
                for t in texts:
                    starts.append(at)
                    at += len(t) + 1
                self._texts = texts
                self._joined, self._starts = "\0".join(texts), starts
        if "\0" in s:  # the separator: test each token's text
            ids = frozenset(i for i, t in enumerate(self._texts) if s in t)
        else:
            found, joined, starts = set(), self._joined, self._starts
            at = joined.find(s)
            while at >= 0:
                i = bisect.bisect_right(starts, at) - 1
                found.add(i)
                at = joined.find(s, starts[i] + len(self._texts[i]) + 1)  # next token's text
            ids = frozenset(found)
        with self._lock:
            self._containing[s] = ids
            while len(self._containing) > self.CONTAINING_CACHE:
                self._containing.popitem(last=False)
        return ids

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
