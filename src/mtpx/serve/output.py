"""A chat answer's text split into what the API returns: `reasoning_content` (the `<think>…</think>` part, as vLLM's
qwen3 reasoning parser and llama.cpp's --reasoning-format deepseek split it), `content`, and `tool_calls` (Qwen's
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, the hermes format; or, under a forced tool_choice, the
whole output as JSON). One parser serves streams (OpenAI delta dicts as text arrives, tags split across deltas
held back) and whole responses (the deltas merged), so both give the same message.
"""
from __future__ import annotations

import copy
import json
import re
import uuid

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
REASONING_FORMATS = ("auto", "deepseek", "none")


def starts_in_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt leaves the answer inside a think block (Qwen3.5's generation prompt opens
    `<think>` when thinking is on, and closes an empty one when enable_thinking is false)."""
    tail = prompt[prompt.rfind("<|im_start|>"):] if "<|im_start|>" in prompt else prompt[-200:]
    return tail.rfind(THINK) > tail.rfind(END_THINK)


XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def parse_xml_call(text: str, schemas: dict) -> dict | None:
    """Qwen3.5 / Qwen3-Coder's call format, `<function=NAME><parameter=P>value</parameter>...</function>`, as
    {"name", "arguments"}: a value is text where the function's schema types the parameter as a string (or does
    not know it and it is no JSON), else its JSON value."""
    m = XML_FUNCTION.search(text)
    if m is None:
        return None
    name = m.group(1).strip()
    props = (schemas.get(name) or {}).get("properties") or {}
    args = {}
    for key, raw in XML_PARAMETER.findall(m.group(2)):
        key = key.strip()
        if (props.get(key) or {}).get("type") == "string":
            args[key] = raw
            continue
        try:
            args[key] = json.loads(raw)
        except json.JSONDecodeError:
            args[key] = raw
    return {"name": name, "arguments": args}


def new_call(index: int, name: str, arguments: str) -> dict:
    return {"index": index, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments}}


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
            if self.mode == "call":
                return out
            keep = 0  # hold back a possible start of a tag at the end
            for t in tags:
                for j in range(min(len(t) - 1, len(self.buf)), 0, -1):
                    if self.buf.endswith(t[:j]):
                        keep = max(keep, j)
                        break
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
            self.mode = "call"
        elif tag == END_CALL:
            call = self._parse_call(before)
            if call is None:  # not a call after all: keep the text as content
                self.mode = "content"
                out.append({"content": CALL + before + END_CALL})
                return
            out.append({"tool_calls": [call]})
            self.mode, self.strip_next = "content", True

    def _parse_call(self, text: str) -> dict | None:
        if text.strip().startswith("<function="):
            value = parse_xml_call(text, self.schemas)
        else:
            try:
                value = json.loads(text.strip())
            except json.JSONDecodeError:
                return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        args = value.get("arguments", value.get("parameters", {}))
        call = new_call(self.calls, value["name"], args if isinstance(args, str) else json.dumps(args))
        self.calls += 1
        return call

    def finish(self) -> list[dict]:
        out: list[dict] = []
        text, self.buf = self.buf, ""
        if self.forced:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:  # cut short (max_tokens): return what there is
                return [{"content": text}] if text else []
            if self.forced == "named":
                name, args = self.name, value
            else:
                name, args = value.get("name"), value.get("arguments", {})
            out.append({"tool_calls": [new_call(0, name, json.dumps(args))]})
            self.calls = 1
            return out
        if self.mode == "call":  # an unfinished call: its text is content
            self.mode = "content"
            text = CALL + text
        self._release(text, out, final=True)
        return out


def merge(deltas: list[dict]) -> dict:
    """One assistant message from the deltas of a whole answer."""
    content, reasoning, calls = [], [], []
    for d in deltas:
        content.append(d.get("content") or "")
        reasoning.append(d.get("reasoning_content") or "")
        for c in d.get("tool_calls") or []:
            calls.append({k: v for k, v in c.items() if k != "index"})
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
        other.parser = copy.copy(self.parser)
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
