"""Tool calls streamed as they are written (serve/toolcalls.py through serve/output.py's parser): a first delta with
the id, type and name, then argument fragments of the same index that concatenate to the arguments' JSON."""
from __future__ import annotations

import json

import pytest

from mtpx.serve.output import OutputParser, merge

SCHEMAS = {"get_weather": {"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}


def stream(parser: OutputParser, text: str, step: int) -> list[dict]:
    """The parser's deltas for `text` fed `step` characters at a time, then its last ones."""
    return [d for i in range(0, len(text), step) for d in parser.feed(text[i:i + step])] + parser.finish()


def call_entries(deltas: list[dict]) -> list[dict]:
    return [e for d in deltas for e in d.get("tool_calls") or []]


def check_shape(entries: list[dict]) -> dict[int, str]:
    """Each call: one first entry (id, type, name), then fragments only; returns index -> concatenated arguments."""
    args: dict[int, str] = {}
    for e in entries:
        if e["index"] not in args:
            assert e["id"].startswith("call_") and e["type"] == "function" and e["function"]["name"]
            args[e["index"]] = ""
        else:
            assert set(e) == {"index", "function"} and set(e["function"]) == {"arguments"}
        args[e["index"]] += e["function"]["arguments"]
    return args


@pytest.mark.parametrize("step", [1, 3, 7])
def test_json_call_arguments_stream_as_fragments(step):
    arguments = '{"city": "Paris", "when": {"days": [1, 2]}, "note": "a } and a \\" inside"}'
    text = f'Sure.<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    deltas = stream(OutputParser(tools=True), text, step)
    entries = call_entries(deltas)
    assert check_shape(entries) == {0: arguments}
    assert sum(bool(e["function"]["arguments"]) for e in entries) > 1  # streamed, not one delta at the end
    assert json.loads(arguments)["note"] == 'a } and a " inside'
    m = merge(deltas)
    assert m["content"] == "Sure." and m["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                          "arguments": arguments}


def test_xml_call_streams_one_fragment_per_parameter():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n123\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>")
    entries = call_entries(stream(OutputParser(tools=True, schemas=SCHEMAS), text, 1))
    assert [e["function"]["arguments"] for e in entries] == ["", '{"city": "123"', ', "days": 3', "}"]
    assert json.loads(check_shape(entries)[0]) == {"city": "123", "days": 3}


def test_two_calls_get_indices_0_and_1():
    text = ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    p = OutputParser(tools=True)
    assert check_shape(call_entries(stream(p, text, 2))) == {0: '{"x": 1}', 1: "{}"}
    assert p.calls == 2


def test_forced_named_call_streams_the_whole_output_as_arguments():
    deltas = stream(OutputParser(forced="named", name="get_weather"), '{"city": "Oslo", "days": 2}', 4)
    entries = call_entries(deltas)
    assert entries[0]["function"]["name"] == "get_weather" and len(entries) > 2
    assert json.loads(check_shape(entries)[0]) == {"city": "Oslo", "days": 2}


def test_forced_required_call_streams_its_arguments():
    text = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    entries = call_entries(stream(OutputParser(forced="required"), text, 5))
    assert entries[0]["function"]["name"] == "get_weather" and check_shape(entries) == {0: '{"city": "Oslo"}'}


def test_shapes_that_do_not_stream_are_sent_whole_or_kept_as_content():
    # arguments before the name, or as a JSON string: one delta once the call is complete
    for body, args in (('{"arguments": {"x": 1}, "name": "f"}', '{"x": 1}'),
                       ('{"name": "f", "arguments": "{\\"x\\": 1}"}', '{"x": 1}')):
        entries = call_entries(stream(OutputParser(tools=True), f"<tool_call>{body}</tool_call>", 3))
        assert len(entries) == 1 and entries[0]["function"] == {"name": "f", "arguments": args}
    # no function name at all: the text stays content
    p = OutputParser(tools=True)
    m = merge(stream(p, "<tool_call>not json</tool_call>", 3))
    assert m["content"] == "<tool_call>not json</tool_call>" and "tool_calls" not in m and p.calls == 0


def test_call_cut_short_after_its_name_stays_a_call():
    deltas = stream(OutputParser(tools=True), '<tool_call>{"name": "f", "arguments": {"x": [1, ', 4)
    assert check_shape(call_entries(deltas)) == {0: '{"x": [1, '}
    p = OutputParser(tools=True)  # cut short before the name: content, as the model wrote it
    assert merge(stream(p, '<tool_call>{"na', 4))["content"] == '<tool_call>{"na'
