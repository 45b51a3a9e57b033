"""LLM.chat (tools, tool_choice, response_format, chat_template_kwargs, reasoning) and `mtpx run --json-schema`."""
import json

import pytest

import mtpx
from mtpx.cli import main

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"enum": ["Paris", "Oslo"]}}}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def llm(ckpt_factory):
    return mtpx.LLM(ckpt_factory(template="qwen"))


def test_chat_named_tool_call_and_json_answer(llm):
    user = [{"role": "user", "content": "Weather?"}]
    out = llm.chat(user, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                   max_tokens=60, spec_type="mtp", spec_draft_n_max=3)
    call = out.message["tool_calls"][0]
    assert out.finish_reason == "tool_calls" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
    history = user + [out.message, {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    final = llm.chat(history, tools=[WEATHER], max_tokens=60, chat_template_kwargs={"enable_thinking": False},
                     response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
    assert isinstance(json.loads(final.message["content"])["ok"], bool)


def test_chat_reasoning_goes_to_reasoning_content(llm):
    out = llm.chat([{"role": "user", "content": "Hi"}], max_tokens=8)
    assert out.message["reasoning_content"] == out.text and out.message["content"] == ""
    out = llm.chat([{"role": "user", "content": "Hi"}], max_tokens=8, reasoning_format="none")
    assert out.message["content"] == out.text


def test_run_json_schema(ckpt_factory, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main(["run", "--model", str(ckpt_factory(template="qwen")), "--prompt", "x", "--max-tokens", "30",
                 "--json-schema", str(schema), "--spec-type", "mtp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(json.loads(out["text"])["ok"], bool)
