"""A chat answer's text split into what the API returns: `reasoning_content` (the `<think>…</think>` part, as vLLM's
qwen3 reasoning parser and llama.cpp's --reasoning-format deepseek split it), `content`, and `tool_calls` (Qwen's
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the hermes format; or, under a forced tool_choice, the
whole output as JSON). One parser serves streams (OpenAI delta dicts as text arrives, tags split across deltas
held back; a tool call's arguments streamed as fragments while it is written: serve/toolcalls.py) and whole responses
(the deltas merged), so both give the same message.
"""
from __future__ import annotations

import copy

from mtpx.serve.toolcalls import CallStream

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
REASONING_FORMATS = ("auto", "deepseek", "none")


def starts_in_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt leaves the answer inside a think block (Qwen3.5's generation prompt opens
    `<think>` when thinking is on, and closes an empty one when enable_thinking is false)."""
    tail = prompt[prompt.rfind("<|im_start|>"):] if "<|im_start|>" in prompt else prompt[-200:]
    return tail.rfind(THINK) > tail.rfind(END_THINK)


class OutputParser:
    """feed(text) -> deltas, finish() -> the last deltas. reasoning: split think blocks; in_reasoning: the answer
    starts inside one. tools: parse <tool_call> blocks. forced: None, or "named" / "required" with `name`: the
    whole output is the call's JSON."""

    def __init__(self, *, reasoning: bool = False, in_reasoning: bool = False, tools: bool = False,
                 forced: str | None = None, name: str | None = None, schemas: dict | None = None):
        self.reasoning, self.tools, self.forced, self.name = reasoning, tools, forced, name
        self.schemas = schemas or {}  # function name -> its parameters schema (types of XML-format arguments)
        self.mode = "reasoning" if reasoning and in_reasoning else "content"
        self.buf = ""  # text not yet released (a possible tag start, or a tool call being read)
        self.calls = 0
        self.strip_next = False  # drop whitespace that starts content right after </think>
        self.started = False  # content or reasoning released yet
        # the call being read (mode "call", or the whole output when forced) and how much of its text it has seen
        self.call = CallStream(0, self.schemas, name if forced == "named" else None) if forced else None
        self.fed = 0

    def _tags(self) -> list[str]:
        if self.forced:
            return []
        if self.mode == "reasoning":
            return [END_THINK]
        if self.mode == "call":
            return [END_CALL]
        tags = [CALL] if self.tools else []
        if self.reasoning and not self.started:
            tags.append(THINK)
        return tags

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        out: list[dict] = []
        if self.forced:
            self._call_deltas(self.call.feed(text), out)
            return out
        while True:
            tags = self._tags()
            hits = [(self.buf.find(t), t) for t in tags if t in self.buf]
            if hits:
                at, tag = min(hits)
                before, self.buf = self.buf[:at], self.buf[at + len(tag):]
                self._release(before, out, final=True)
                self._switch(tag, before, out)
                continue
            keep = 0  # hold back a possible start of a tag at the end
            for t in tags:
                for j in range(min(len(t) - 1, len(self.buf)), 0, -1):
                    if self.buf.endswith(t[:j]):
                        keep = max(keep, j)
                        break
            if self.mode == "call":  # the call's text stays in buf (a call of no streamable shape is parsed whole)
                self._call_deltas(self.call.feed(self.buf[self.fed:len(self.buf) - keep]), out)
                self.fed = len(self.buf) - keep
                return out
            release, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            self._release(release, out)
            return out

    def _release(self, text: str, out: list[dict], final: bool = False) -> None:
        if self.mode == "call" or not text:
            return
        if self.strip_next and self.mode == "content":
            text = text.lstrip()
            if not text:
                return
            self.strip_next = False
        if not self.started and self.mode == "content" and not text.strip() and not final:
            self.buf = text + self.buf  # leading whitespace: wait (a <think> or <tool_call> may follow)
            return
        self.started = True
        out.append({"reasoning_content" if self.mode == "reasoning" else "content": text})

    def _switch(self, tag: str, before: str, out: list[dict]) -> None:
        if tag == THINK:
            self.mode = "reasoning"
        elif tag == END_THINK:
            self.mode, self.strip_next, self.started = "content", True, False
        elif tag == CALL:
            self.mode, self.call, self.fed = "call", CallStream(self.calls, self.schemas), 0
        elif tag == END_CALL:
            self._call_deltas(self.call.feed(before[self.fed:]), out)
            self.mode = "content"
            if not self._end_call(out):  # not a call after all: keep the text as content
                out.append({"content": CALL + before + END_CALL})
                return
            self.strip_next = True

    def _call_deltas(self, entries: list[dict], out: list[dict]) -> None:
        if entries:
            out.append({"tool_calls": entries})
            self.calls += sum("id" in e for e in entries)

    def _end_call(self, out: list[dict]) -> bool:
        """The current call's last deltas; False when its text was no call (nothing of it was sent)."""
        last = self.call.end()
        self.call = None
        if last is None:
            return False
        self._call_deltas(last, out)
        return True

    def finish(self) -> list[dict]:
        out: list[dict] = []
        text, self.buf = self.buf, ""
        if self.forced:
            if self.call is not None and not self._end_call(out):  # no call in it: return what there is
                return [{"content": text}] if text else []
            return out
        if self.mode == "call":  # an unfinished call (cut short): a call if its name was read, else content
            self.mode = "content"
            self._call_deltas(self.call.feed(text[self.fed:]), out)
            if self._end_call(out):
                return out
            text = CALL + text
        self._release(text, out, final=True)
        return out


def merge(deltas: list[dict]) -> dict:
    """One assistant message from the deltas of a whole answer."""
    content, reasoning, by_index = [], [], {}
    for d in deltas:
        content.append(d.get("content") or "")
        reasoning.append(d.get("reasoning_content") or "")
        for c in d.get("tool_calls") or []:  # a call's first delta, then fragments of its arguments
            call = by_index.setdefault(c["index"], {"id": c.get("id"), "type": "function",
                                                    "function": {"name": c["function"].get("name", ""),
                                                                 "arguments": ""}})
            call["function"]["arguments"] += c["function"].get("arguments") or ""
    calls = list(by_index.values())
    message = {"role": "assistant", "content": "".join(content) or (None if calls else "")}
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


class Responder:
    """One request's answer in the API's shapes: chat deltas or a whole message (content, reasoning_content,
    tool_calls, finish_reason "tool_calls" when it made some), and the logprobs blocks of chat and completions."""

    def __init__(self, tokenizer, *, chat: bool, opts=None, reasoning_format: str = "auto", prompt_tail: str = "",
                 eos: set[int] = frozenset()):
        self.tokenizer, self.chat, self.eos = tokenizer, chat, set(eos)
        mode = opts.tool_mode if opts is not None and chat else "none"
        template = getattr(tokenizer, "chat_template", None) or ""
        split = chat and (reasoning_format == "deepseek" or (reasoning_format == "auto" and THINK in template))
        constrained = opts is not None and opts.grammar is not None  # the whole output is the grammar's
        self.parser = OutputParser(reasoning=split and not constrained,
                                   in_reasoning=starts_in_reasoning(prompt_tail), tools=mode == "auto",
                                   forced=mode if mode in ("named", "required") else None,
                                   name=opts.forced_tool if opts is not None else None,
                                   schemas={t["function"]["name"]: t["function"]["parameters"]
                                            for t in (opts.tools if opts is not None else [])})
        self.top = opts.logprobs if opts is not None else None

    def fresh(self) -> "Responder":
        """A copy for another choice of the same request, made before this one has read anything: the same
        settings, a parser of its own."""
        other = copy.copy(self)
        other.parser = copy.deepcopy(self.parser)  # its call reader too (a forced call's is made up front)
        return other

    def feed(self, text: str) -> list[dict]:
        return self.parser.feed(text)

    def finish(self) -> list[dict]:
        return self.parser.finish()

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.parser.calls and reason == "stop" else reason

    def message(self, text: str) -> dict:
        return merge(self.feed(text) + self.finish())

    def _token(self, t: int) -> tuple[str, list[int]]:
        s = self.tokenizer.decode([t])
        return s, list(s.encode("utf-8", "replace"))

    def logprobs(self, token_ids: list[int], logprobs: list | None) -> dict | None:
        """The logprobs block for these tokens (eos left out, as it is from the text); None when not asked."""
        if self.top is None or logprobs is None:
            return None
        floor = -9999.0  # an id the grammar or top-k rules out has -inf, which JSON cannot hold (vLLM's value)
        pairs = [(t, (max(lp, floor), [(i, max(v, floor)) for i, v in best]))
                 for t, (lp, best) in zip(token_ids, logprobs) if t not in self.eos]
        if self.chat:
            content = []
            for t, (lp, best) in pairs:
                s, b = self._token(t)
                tops = []
                for i, v in best:
                    si, bi = self._token(i)
                    tops.append({"token": si, "logprob": v, "bytes": bi})
                content.append({"token": s, "logprob": lp, "bytes": b, "top_logprobs": tops})
            return {"content": content}
        tokens = [self._token(t)[0] for t, _ in pairs]
        return {"tokens": tokens, "token_logprobs": [lp for _, (lp, _) in pairs],
                "top_logprobs": [{self._token(i)[0]: v for i, v in best} for _, (_, best) in pairs],
                "text_offset": []}
