"""What a chat or completion request asks beyond text: structured output (`response_format`, `grammar`, `regex`),
tools (`tools`, `tool_choice`), the messages that carry tool calls and results, `chat_template_kwargs`, and
`logprobs` / `top_logprobs`. Read into ChatOptions, checked (a bad value is a FieldError naming the field: the server
answers 400 with that `param`), and turned into the grammar the engine decodes under.

tool_choice `required` or a named function constrains the whole output to JSON, as vLLM does: named, the function's
arguments (its `parameters` schema); required, `{"name": ..., "arguments": ...}` for one of the tools. `auto` leaves
decoding free and the model's own tool-call text (Qwen's `<tool_call>{json}</tool_call>`) is parsed (serve/output.py).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mtpx.engine.constraints import GrammarSpec
from mtpx.engine.params import MAX_LOGPROBS, FieldError, SamplingParams


@dataclass
class ChatOptions:
    grammar: GrammarSpec | None = None
    tools: list[dict] = field(default_factory=list)  # OpenAI tool objects, checked
    tool_choice: str | dict = "auto"  # none | auto | required | {"type": "function", "function": {"name": ...}}
    forced_tool: str | None = None  # the named function the output is the arguments of
    template_kwargs: dict = field(default_factory=dict)
    logprobs: int | None = None  # None: off; else how many top alternatives per token

    @property
    def tool_mode(self) -> str:
        """none | auto | required | named"""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.forced_tool is not None:
            return "named"
        return self.tool_choice if isinstance(self.tool_choice, str) else "auto"

    def apply(self, params: SamplingParams) -> SamplingParams:
        if self.grammar is None and self.logprobs is None:
            return params
        return dataclasses.replace(params, grammar=self.grammar, logprobs=self.logprobs)


def _obj(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise FieldError(where, f"'{where}' must be an object", "invalid_type")
    return value


def read_tools(tools: Any) -> list[dict]:
    """The checked `tools` array: each {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise FieldError("tools", "'tools' must be an array", "invalid_type")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        tool = _obj(tool, where)
        if tool.get("type", "function") != "function":
            raise FieldError(f"{where}.type", f"'{where}.type' must be 'function'", "invalid_value")
        fn = _obj(tool.get("function"), f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise FieldError(f"{where}.function.name", f"'{where}.function.name' is required (a non-empty string)",
                             "missing_required_parameter")
        if name in names:
            raise FieldError(f"{where}.function.name", f"two tools are named {name!r}", "invalid_value")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise FieldError(f"{where}.function.parameters", f"'{where}.function.parameters' must be a JSON schema "
                             "object", "invalid_type")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def read_tool_choice(choice: Any, tools: list[dict]) -> tuple[str | dict, str | None]:
    """(tool_choice, the forced function's name or None)."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise FieldError("tool_choice", f"'tool_choice' must be none, auto, required or a function, got "
                             f"{choice!r}", "invalid_value")
        if choice == "required" and not tools:
            raise FieldError("tool_choice", "'tool_choice' is 'required' but the request has no 'tools'",
                             "invalid_value")
        return choice, None
    choice = _obj(choice, "tool_choice")
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise FieldError("tool_choice", "'tool_choice' as an object must be {\"type\": \"function\", \"function\": "
                         "{\"name\": ...}}", "invalid_value")
    if name not in {t["function"]["name"] for t in tools}:
        raise FieldError("tool_choice", f"'tool_choice' names the function {name!r}, which is not in 'tools'",
                         "invalid_value")
    return choice, name


def tool_grammar(tools: list[dict], mode: str, name: str | None) -> GrammarSpec | None:
    """The grammar of a forced tool call: named, the function's arguments; required, {"name", "arguments"}."""
    if mode == "named":
        i, tool = next((i, t) for i, t in enumerate(tools) if t["function"]["name"] == name)
        return GrammarSpec.json_schema(tool["function"]["parameters"], f"tools[{i}].function.parameters")
    if mode == "required":
        options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]}}
                   for t in tools]
        return GrammarSpec.json_schema(options[0] if len(options) == 1 else {"anyOf": options}, "tools")
    return None


def read_response_format(data: dict) -> GrammarSpec | None:
    """The grammar of `response_format` (OpenAI: text, json_object, json_schema; llama.cpp's json_object with a
    `schema`), or of the `grammar` (GBNF / EBNF) and `regex` fields (llama.cpp's and vLLM's guided_* spellings)."""
    for name, kind in (("grammar", "ebnf"), ("guided_grammar", "ebnf"), ("regex", "regex"), ("guided_regex", "regex")):
        value = data.get(name)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise FieldError(name, f"'{name}' must be a non-empty string", "invalid_type")
            return GrammarSpec(kind, value, name)
    if data.get("guided_json") is not None:
        return GrammarSpec.json_schema(data["guided_json"], "guided_json")
    fmt = data.get("response_format")
    if fmt is None:
        return None
    fmt = _obj(fmt, "response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        if fmt.get("schema") is not None:
            return GrammarSpec.json_schema(fmt["schema"], "response_format.schema")
        return GrammarSpec("json_object", "", "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise FieldError("response_format.json_schema", "'response_format.json_schema' must be an object with "
                             "a 'schema' (and a 'name')", "invalid_value")
        return GrammarSpec.json_schema(spec["schema"], "response_format.json_schema.schema")
    raise FieldError("response_format.type", f"'response_format.type' must be text, json_object or json_schema, got "
                     f"{json.dumps(kind)[:40]}", "invalid_value")


def read_logprobs(data: dict, chat: bool) -> int | None:
    """Chat: `logprobs` (boolean) and `top_logprobs` (0..MAX_LOGPROBS); completions: `logprobs` (an integer)."""
    if chat:
        on, top = data.get("logprobs"), data.get("top_logprobs")
        if on is not None and not isinstance(on, bool):
            raise FieldError("logprobs", "'logprobs' must be a boolean", "invalid_type")
        if top is not None:
            if not isinstance(top, int) or isinstance(top, bool):
                raise FieldError("top_logprobs", "'top_logprobs' must be an integer", "invalid_type")
            if not 0 <= top <= MAX_LOGPROBS:
                raise FieldError("top_logprobs", f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}")
            if not on:
                raise FieldError("top_logprobs", "'top_logprobs' needs 'logprobs': true", "invalid_value")
        return (top or 0) if on else None
    n = data.get("logprobs")
    if n is None or n is False:
        return None
    if not isinstance(n, int) or isinstance(n, bool):
        raise FieldError("logprobs", "'logprobs' must be an integer", "invalid_type")
    if not 0 <= n <= MAX_LOGPROBS:
        raise FieldError("logprobs", f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {n}")
    return n


def read_options(data: dict, chat: bool) -> ChatOptions:
    """Everything above from a request body."""
    opts = ChatOptions(logprobs=read_logprobs(data, chat))
    if chat:
        opts.tools = read_tools(data.get("tools"))
        opts.tool_choice, opts.forced_tool = read_tool_choice(data.get("tool_choice"), opts.tools)
        kwargs = data.get("chat_template_kwargs")
        if kwargs is not None:
            opts.template_kwargs = {k: v for k, v in _obj(kwargs, "chat_template_kwargs").items()
                                    if k not in ("messages", "add_generation_prompt", "tools", "bos_token",
                                                 "eos_token")}
    opts.grammar = tool_grammar(opts.tools, opts.tool_mode, opts.forced_tool) or read_response_format(data)
    return opts


def template_messages(messages: list[dict], checked: list[dict]) -> list[dict]:
    """The messages for the chat template: `checked` (role and text content, as serve/api.py checked them) plus the
    tool fields of the originals: an assistant's `tool_calls` (arguments as objects, as templates expect them) and
    `reasoning_content`, a tool result's `tool_call_id` and `name`."""
    out = []
    for i, (m, c) in enumerate(zip(messages, checked)):
        c = dict(c)
        if m.get("role") == "tool":
            c["role"] = "tool"
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    c[key] = m[key]
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise FieldError(f"messages[{i}].tool_calls", "'tool_calls' must be an array", "invalid_type")
            c["tool_calls"] = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise FieldError(f"messages[{i}].tool_calls[{j}].function.name", "a tool call needs "
                                     "function.name", "missing_required_parameter")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass  # kept as the text the client sent
                c["tool_calls"].append({"id": call.get("id"), "type": "function",
                                        "function": {"name": fn["name"], "arguments": args}})
        if isinstance(m.get("reasoning_content"), str):
            c["reasoning_content"] = m["reasoning_content"]
        out.append(c)
    return out


def plain_messages(messages: list) -> list:
    """The messages as serve/api.py's check reads them: a tool result as a user turn, tool calls left out (their
    fields are added back by template_messages)."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            if m.get("role") == "tool":
                m["role"] = "user"
        out.append(m)
    return out


def render_kwargs(opts: ChatOptions) -> dict:
    """What the chat template gets besides the messages: chat_template_kwargs, and the tools (unless tool_choice
    is none)."""
    kwargs = dict(opts.template_kwargs)
    if opts.tools and opts.tool_choice != "none":
        kwargs["tools"] = opts.tools
    return kwargs
