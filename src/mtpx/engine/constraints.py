"""Constrained decoding: a grammar (JSON schema, any JSON object, regex, EBNF) turned into a token mask by xgrammar.

The mask is applied to the processed logits of every position a token is chosen at — the prefill's first token, each
plain decode step, and every row of a verify pass (row j after the matcher has taken drafts[:j]) — before
temperature, top-k/top-p/min-p, greedy argmax or rejection sampling. So a verify row sees exactly the distribution a
constrained plain decode step would at that position, and speculation stays lossless with a grammar active. Drafts are
pruned at the first token the grammar forbids (verify would reject it: its target probability is 0).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from mtpx.engine.params import FieldError

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "ebnf")


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. kind: json_schema (source: the schema as JSON text), json_object (any JSON
    object), regex, ebnf (GBNF as llama.cpp and xgrammar read it). field: the request field it came from, named in
    the error when it does not compile."""
    kind: str
    source: str = ""
    field: str = "grammar"

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise FieldError(self.field, f"unknown grammar kind {self.kind!r}: use one of {list(GRAMMAR_KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict | str, field: str = "json_schema") -> "GrammarSpec":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise FieldError(field, f"'{field}' is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise FieldError(field, f"'{field}' must be a JSON schema object", "invalid_type")
        # the schema's own key order: xgrammar generates properties in it (as OpenAI and vLLM do), and a tool call
        # must read {"name", "arguments"} in that order for its arguments to stream (serve/toolcalls.py)
        return cls("json_schema", json.dumps(schema), field)


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - a dependency
        raise FieldError(None, f"structured outputs need the xgrammar package ({e})") from None
    return xgrammar


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer and vocabulary (xgrammar's compiler caches the results). Special
    tokens (<|im_end|>, <tool_call>, ...) are never allowed inside a grammar; the model's eos ids end it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: set[int]):
        self.vocab_size = vocab_size
        self.eos = sorted(eos)
        self._tokenizer = tokenizer
        self._compiler = None
        self._lock = threading.Lock()
        self._compiled: dict[GrammarSpec, Any] = {}

    def _build(self):
        xgr = _xgr()
        hf = self._tokenizer._tok  # the `tokenizers` object: its vocabulary and which ids are special
        specials = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        n = hf.get_vocab_size(with_added_tokens=True)
        # an empty string marks an id xgrammar never allows (special tokens, ids past the tokenizer's vocabulary)
        vocab = ["" if i in specials else (hf.id_to_token(i) or "") for i in range(n)]
        byte_level = "ByteLevel" in json.dumps(json.loads(hf.to_str()).get("decoder") or {})
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL if byte_level else xgr.VocabType.RAW,
                                 vocab_size=max(self.vocab_size, n), stop_token_ids=self.eos)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar; FieldError naming spec.field when it does not compile."""
        with self._lock:
            if spec in self._compiled:
                return self._compiled[spec]
            if self._compiler is None:
                self._build()
            c = self._compiler
            try:
                if spec.kind in ("json_object", "json_schema"):
                    # compact JSON (no free whitespace): a model cannot wander in whitespace forever; json_object
                    # is any object, as OpenAI's response_format means it
                    out = c.compile_json_schema(spec.source if spec.kind == "json_schema" else '{"type": "object"}',
                                                any_whitespace=False, strict_mode=True)
                elif spec.kind == "regex":
                    out = c.compile_regex(spec.source)
                else:
                    out = c.compile_grammar(spec.source)
            except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
                raise FieldError(spec.field, f"'{spec.field}' is not a usable {spec.kind.replace('_', ' ')}: "
                                 f"{str(e).strip()[:300]}") from None
            if len(self._compiled) > 64:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[spec] = out
            return out

    def constraint(self, spec: GrammarSpec) -> "Constraint":
        return Constraint(self.compile(spec), self.vocab_size)


class Constraint:
    """One sequence's grammar state (an xgrammar matcher) over its generated tokens."""

    def __init__(self, compiled: Any, vocab_size: int):
        xgr = _xgr()
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """bool [V]: the tokens the grammar allows next."""
        if self.matcher.is_terminated():  # ended (a stop token taken); what follows is not the grammar's
            return torch.ones(self.vocab_size, dtype=torch.bool)
        self.matcher.fill_next_token_bitmask(self._bitmask)
        words = self._bitmask[0]
        return ((words[:, None] >> self._bits) & 1).flatten()[:self.vocab_size].bool()

    def accept(self, token: int) -> bool:
        """Advance over `token`; False (and no change) when the grammar forbids it."""
        if self.matcher.is_terminated():
            return False
        return bool(self.matcher.accept_token(int(token)))

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            if not self.accept(t):
                break

    def rollback(self, n: int) -> None:
        if n:
            self.matcher.rollback(n)

    def masks(self, drafts: list[int], eos: set[int], forced_up_to: int = 0) -> tuple[list[int], torch.Tensor]:
        """(the drafts cut at the first one the grammar forbids or that would end it, masks [len + 1, V]): row j is
        what the grammar allows after drafts[:j]. Then, up to `forced_up_to` drafts in all, the tokens the grammar
        forces (the only one it allows) are drafted too: verified like any draft, accepted with probability 1, with
        no drafter pass. The matcher ends where it started."""
        rows = [self.allowed()]
        out = []
        for d in drafts:
            if d in eos or not bool(rows[-1][d]) or not self.accept(d):
                break
            out.append(d)
            rows.append(self.allowed())
        while len(out) < forced_up_to:
            allowed = rows[-1]
            if int(allowed.sum()) != 1:
                break
            t = int(allowed.nonzero()[0, 0])
            if t in eos or not self.accept(t):
                break
            out.append(t)
            rows.append(self.allowed())
        self.rollback(len(out))
        return out, torch.stack(rows)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with the forbidden ids at -inf (a new tensor)."""
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
