"""One tool call's text, as the model writes it, turned into OpenAI tool-call deltas while it is generated.

The first delta of a call carries its index, id, type and function name (arguments "" or the first fragment); the
ones after it carry argument fragments with the same index, so a client (the openai package's stream accumulation,
vLLM's and OpenAI's own shape) concatenates them into the call's arguments. Formats:
- Qwen's hermes JSON, `{"name": ..., "arguments": {...}}`: once the name and the `"arguments":` key are read, the
  arguments' JSON text streams as written, up to where its value closes (a nesting count that knows strings);
- Qwen3.5 / Qwen3-Coder's `<function=NAME><parameter=P>value</parameter>...</function>`: one fragment per complete
  parameter (`{"P": value`, then `, "Q": value`, then `}`), typed by the function's schema as parse_xml_call does;
- a forced named tool_choice: the whole output is the arguments (the name is known from the start).
A call whose text matches none of these shapes as it streams (keys in another order, arguments as a JSON string) is
parsed whole at its end and sent as one delta; one that never names a function is no call (the caller keeps its text
as content).
"""
from __future__ import annotations

import json
import re
import uuid

XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)
XML_HEAD = re.compile(r"\s*<function=([^>\n]+)>")
XML_NEXT_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)
# up to the arguments' opening bracket (arguments as a JSON string or scalar do not stream: parsed at the end)
JSON_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=[{\[])')


def xml_value(key: str, raw: str, props: dict) -> object:
    """A parameter's value: text where the schema types it as a string (or it is no JSON), else its JSON value."""
    if (props.get(key) or {}).get("type") == "string":
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_xml_call(text: str, schemas: dict) -> dict | None:
    """Qwen3.5 / Qwen3-Coder's call format, `<function=NAME><parameter=P>value</parameter>...</function>`, as
    {"name", "arguments"}."""
    m = XML_FUNCTION.search(text)
    if m is None:
        return None
    name = m.group(1).strip()
    props = (schemas.get(name) or {}).get("properties") or {}
    return {"name": name, "arguments": {k.strip(): xml_value(k.strip(), raw, props)
                                        for k, raw in XML_PARAMETER.findall(m.group(2))}}


def parse_call(text: str, schemas: dict) -> dict | None:
    """A whole call's text (JSON or XML format) as {"name", "arguments": JSON text}; None when it is no call."""
    if text.strip().startswith("<function="):
        value = parse_xml_call(text, schemas)
    else:
        try:
            value = json.loads(text.strip())
        except json.JSONDecodeError:
            return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return {"name": value["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}


def new_call(index: int, name: str, arguments: str) -> dict:
    """A call's first delta."""
    return {"index": index, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments}}


class JsonValue:
    """Where a JSON object or array at the start of a text ends, as the text arrives: feed() returns the part of
    each piece that belongs to the value (leading whitespace dropped, nothing after its closing bracket)."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped, self.closed = 0, False, False, False
        self.opened = False

    def feed(self, text: str) -> str:
        if self.closed:
            return ""
        start = 0
        if not self.opened:
            stripped = text.lstrip()
            if not stripped:
                return ""
            start = len(text) - len(stripped)
            self.opened = True
        for j in range(start, len(text)):
            c = text[j]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.closed = True
                    return text[start:j + 1]
        return text[start:]


class CallStream:
    """One call's text (after `<tool_call>`, or a forced call's whole output) → its deltas. feed(text) and end()
    return tool_calls entries; `started` once the first one (with the name) went out."""

    def __init__(self, index: int, schemas: dict | None = None, name: str | None = None) -> None:
        """name: a forced named call, whose whole text is the arguments."""
        self.index, self.schemas = index, schemas or {}
        self.text = ""  # everything fed so far
        self.started = False
        self.format: str | None = None  # json | xml | args, once the head is read
        self.name = name
        self.value = JsonValue()
        self.pos = 0  # json / args: text consumed by the value scanner; xml: text consumed by parameters
        self.params = 0  # xml: parameters sent
        self.xml_closed = False
        if name is not None:
            self.format = "args"

    def _head(self, out: list[dict]) -> None:
        """Read the call's head (its name) once the text holds it."""
        if self.format == "args":
            if self.text.strip():
                self._start(out, self.name)
            return
        m = JSON_HEAD.match(self.text)
        if m is not None:
            self.format, self.pos = "json", m.end()
            self._start(out, json.loads(m.group(1)))
            return
        m = XML_HEAD.match(self.text)
        if m is not None:
            self.format, self.pos = "xml", m.end()
            self._start(out, m.group(1).strip())

    def _start(self, out: list[dict], name: str) -> None:
        self.name, self.started = name, True
        out.append(new_call(self.index, name, ""))

    def _args(self, out: list[dict], fragment: str) -> None:
        if not fragment:
            return
        if out:  # fragments of one feed ride on its last delta
            out[-1]["function"]["arguments"] += fragment
        else:
            out.append({"index": self.index, "function": {"arguments": fragment}})

    def feed(self, text: str) -> list[dict]:
        self.text += text
        out: list[dict] = []
        if not self.started:
            self._head(out)
            if not self.started:
                return out
        if self.format in ("json", "args"):
            self._args(out, self.value.feed(self.text[self.pos:]))
            self.pos = len(self.text)
        else:
            self._xml(out)
        return out

    def _xml(self, out: list[dict], end: bool = False) -> None:
        props = (self.schemas.get(self.name) or {}).get("properties") or {}
        while not self.xml_closed:
            m = XML_NEXT_PARAMETER.match(self.text, self.pos)
            if m is not None:
                key = m.group(1).strip()
                value = xml_value(key, m.group(2), props)
                self._args(out, ("{" if self.params == 0 else ", ") + json.dumps(key) + ": " + json.dumps(value))
                self.params += 1
                self.pos = m.end()
                continue
            rest = self.text[self.pos:].lstrip()
            if rest.startswith("</function>") or end:
                self._args(out, "}" if self.params else "{}")
                self.xml_closed = True
            return

    def end(self) -> list[dict] | None:
        """The call's last deltas once its text is complete (or cut short); None when the text is no call."""
        out: list[dict] = []
        if not self.started:
            if self.format == "args":  # a forced call with no output at all
                return None
            call = parse_call(self.text, self.schemas)  # a shape that does not stream: the whole call at once
            if call is None:
                return None
            self.started = True
            return [new_call(self.index, call["name"], call["arguments"])]
        if self.format == "xml":
            self._xml(out, end=True)
        return out
