"""A generation in flight as its client sees it: text so far, stop strings, what has been streamed, timing."""
from __future__ import annotations

from dataclasses import dataclass

from mtpx.engine.sequence import Sequence
from mtpx.tokenizer import IncrementalText, Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    stats: dict  # engine/stats.py
    finish_reason: str = "length"
    logprobs: list | None = None  # per token of token_ids: (logprob, [(id, logprob), ...]) when asked for
    message: dict | None = None  # LLM.chat: the assistant message (content, reasoning_content, tool_calls)


@dataclass
class StreamEvent:
    text: str  # new text since the previous event
    token_ids: list[int]  # new tokens since the previous event
    completion: Completion | None = None  # set on the last event
    logprobs: list | None = None  # of token_ids, when the request asked for them


class Request:
    """One request's Sequence plus its text: stop strings end it where plain decoding would have, and text is
    released only once it is final (no half UTF-8 character, no possible start of a stop string)."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, stop: list[str] = (), started: float = 0.0):
        self.seq = seq
        self.stop = list(stop)
        self.started = started  # when the request arrived (perf_counter)
        self.first_token_at = 0.0  # when prefill emitted its first token
        self.text = ""
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalText(tokenizer)
        self.sent = 0  # characters of text already streamed
        self.sent_tokens = 0

    def advance(self, new: list[int]) -> StreamEvent:
        """Update the text after `new` tokens were appended to the sequence; apply stop strings; return what can be
        streamed now."""
        seq = self.seq
        gen = seq.generated
        visible = gen[:-1] if gen and gen[-1] in seq.eos else gen
        text = self.detokenizer.decode(visible)
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := text.find(s, max(0, len(self.text) - len(s)))) >= 0]
            if hits:
                cut = min(hits)[0]
                stop_str = min(hits)[1]
                # keep tokens up to the one that completed the stop string, as plain decoding would
                n_before = len(gen) - len(new)
                for n in range(n_before + 1, len(gen) + 1):
                    if stop_str in self.tokenizer.decode(gen[:n]):
                        del seq.tokens[seq.n_prompt + n:]
                        break
                text = text[:cut]
                seq.finish_reason = "stop"
        self.text = text
        if seq.finished:
            safe = len(text)
        else:  # hold back an incomplete UTF-8 character or a possible start of a stop string
            safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
            for s in self.stop:
                for j in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:j]):
                        safe -= j
                        break
        delta = text[self.sent:max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        tokens = seq.generated[self.sent_tokens:]
        logprobs = seq.logprobs[self.sent_tokens:len(seq.generated)] if seq.params.logprobs is not None else None
        self.sent_tokens = len(seq.generated)
        return StreamEvent(delta, tokens, logprobs=logprobs)
