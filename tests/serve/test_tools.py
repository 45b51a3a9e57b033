"""Agents' API against a live server over a random test checkpoint with a Qwen-style chat template: tools and
tool_choice, tool results in the history, structured outputs, reasoning_content, logprobs — through the official
openai client, streamed and not — and the 400s for bad input."""
import json

import httpx
import pytest

import mtpx
from mtpx.engine.params import SpecConfig
from mtpx.serve.app import Server
from mtpx.serve.output import OutputParser, merge

from conftest import LiveServer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                                          "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                         "unit": {"enum": ["C", "F"]}}}}}
ANSWER = {"type": "object", "additionalProperties": False, "required": ["temperature", "ok"],
          "properties": {"temperature": {"type": "integer", "minimum": -50, "maximum": 50}, "ok": {"type": "boolean"}}}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def qwen(ckpt_factory):
    server = Server(mtpx.LLM(ckpt_factory(template="qwen")), model_name="tiny",
                    spec=SpecConfig(spec_type="mtp", spec_draft_n_max=3, spec_draft_policy="fixed"))
    s = LiveServer(server)
    yield s
    s.stop()


def test_named_tool_choice_gives_a_well_formed_call(qwen):
    client = qwen.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[WEATHER], tool_choice={"type": "function",
                                                                     "function": {"name": "get_weather"}},
                                       max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Oslo") and args["unit"] in ("C", "F")
    # streamed: the same call as tool-call deltas the client accumulates
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], tool_choice="required", max_tokens=120, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    assert set(json.loads(calls[0]["arguments"])) == {"city", "unit"}


def test_agent_loop_tool_call_result_and_final_json(qwen):
    """An agent written against the openai client: call a tool, send its result, get a final JSON answer."""
    client = qwen.client()
    messages = [{"role": "system", "content": "You are a weather agent."},
                {"role": "user", "content": "How warm is it in Oslo? Answer as JSON."}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="required",
                                       max_tokens=120, extra_body=NO_THINK)
    call = r.choices[0].message.tool_calls[0]
    messages.append({"role": "assistant", "content": None, "tool_calls": [call.model_dump()]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 7})})
    final = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=120, extra_body=NO_THINK,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}})
    answer = json.loads(final.choices[0].message.content)
    assert set(answer) == {"temperature", "ok"} and final.choices[0].finish_reason == "stop"
    # the history reached the template: the tool call and result are in the prompt
    prompt = qwen.server.llm.tokenizer.apply_chat_template(
        [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                            "arguments": {"city": "Oslo"}}}]},
         {"role": "tool", "content": "7"}])
    assert '"name": "get_weather"' in prompt and "<tool_response>\n7" in prompt


def test_json_object_and_logprobs_streamed(qwen):
    client = qwen.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, max_tokens=30, logprobs=True,
                                       top_logprobs=2, temperature=0)
    lp = r.choices[0].logprobs.content
    assert lp and all(len(t.top_logprobs) == 2 for t in lp)
    assert r.choices[0].message.content.lstrip().startswith("{")
    text, n = "", 0
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                                response_format={"type": "json_object"}, max_tokens=30,
                                                logprobs=True, top_logprobs=2, temperature=0, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            n += len(chunk.choices[0].logprobs.content) if chunk.choices[0].logprobs else 0
    assert text == r.choices[0].message.content and n == len(lp)


def test_reasoning_content_split_and_streamed(qwen):
    client = qwen.client()
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Think."}],
                                       max_tokens=12, temperature=0)
    msg = r.choices[0].message
    # the prompt opens <think>: the random model never closes it, so all of it is reasoning
    assert msg.model_extra.get("reasoning_content") and not msg.content
    streamed = ""
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Think."}],
                                                max_tokens=12, temperature=0, stream=True):
        if chunk.choices:
            streamed += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == msg.model_extra["reasoning_content"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Think."}],
                                       max_tokens=12, temperature=0, extra_body=NO_THINK)
    assert r.choices[0].message.content and not r.choices[0].message.model_extra.get("reasoning_content")


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"regex": "(unclosed"}, "regex"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_bad_input_is_a_400_naming_the_field(qwen, body, param):
    r = httpx.post(qwen.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_parser_splits_tags_across_deltas():
    text = "<think>plan it</think>\n\nSure.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"
    whole = merge(OutputParser(reasoning=True, tools=True).feed(text))
    p = OutputParser(reasoning=True, tools=True)
    parts = [d for i in range(0, len(text), 3) for d in p.feed(text[i:i + 3])] + p.finish()
    streamed = merge(parts)
    for m in (whole, streamed):
        assert m["reasoning_content"] == "plan it" and m["content"] == "Sure."
        assert m["tool_calls"][0]["function"] == {"name": "f", "arguments": "{\"a\": 1}"}


def test_parser_reads_qwen35_xml_calls():
    """Qwen3.5 / Qwen3-Coder write calls as <function=...><parameter=...>; a string parameter stays text."""
    text = ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n123\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    schemas = {"get_weather": {"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
    p = OutputParser(tools=True, schemas=schemas)
    m = merge([d for i in range(0, len(text), 5) for d in p.feed(text[i:i + 5])] + p.finish())
    assert m["content"] == "Let me check.\n"
    assert json.loads(m["tool_calls"][0]["function"]["arguments"]) == {"city": "123", "days": 3}


def test_completions_take_a_regex_and_logprobs(qwen):
    r = qwen.client().completions.create(model="tiny", prompt="The answer:", max_tokens=20, temperature=0,
                                         logprobs=2, extra_body={"regex": "(yes|no)!"})
    choice = r.choices[0]
    assert choice.text in ("yes!", "no!") and choice.finish_reason == "stop"
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.top_logprobs[0]) == 2


def test_n_choices_each_follow_the_schema(qwen):
    r = qwen.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON"}], n=3, temperature=1.0, seed=7, max_tokens=60,
        extra_body=NO_THINK,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}})
    assert [c.index for c in r.choices] == [0, 1, 2]
    answers = [json.loads(c.message.content) for c in r.choices]
    assert all(set(a) == {"temperature", "ok"} for a in answers)
    assert r.usage.completion_tokens > 0


def test_streamed_tool_call_arguments_arrive_in_fragments(qwen):
    """The openai client's stream helper sees the arguments grow delta by delta and accumulates the same call the
    whole response holds."""
    client = qwen.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
              tool_choice="required", max_tokens=120, temperature=0)
    fragments = 0
    with client.chat.completions.stream(**kw) as s:
        for event in s:
            fragments += event.type == "tool_calls.function.arguments.delta"
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert fragments > 1 and call.function.name == "get_weather" and final.choices[0].finish_reason == "tool_calls"
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    assert call.function.arguments == whole.function.arguments
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}


def test_n_streamed_tool_calls_accumulate_per_choice(qwen):
    stream = qwen.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], n=2, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=120, stream=True)
    args, finishes = {}, {}
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                assert tc.index == 0  # the call's index within its choice
                args[ch.index] = args.get(ch.index, "") + (tc.function.arguments or "")
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    assert all(set(json.loads(a)) == {"city", "unit"} for a in args.values()) and len(args) == 2
