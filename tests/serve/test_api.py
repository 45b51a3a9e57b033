"""The OpenAI-compatible API, driven through the `openai` package against a real server on loopback."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

MAX_TOKENS = 20


def chat_messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Question {i}: what does print({i} * {i}) show?"}]


def completion_prompt(i: int) -> str:
    return ["def add(a, b):\n", "import os\n", "The quick brown fox", "for i in range(10):\n",
            "class Point:\n", "Hello, how are", "while True:\n", "print(os.getcwd())"][i % 8] + " " * (i // 8)


def reference(llm, prompt: str, max_tokens: int = MAX_TOKENS):
    """Sequential plain greedy decoding: what every streamed reply must equal."""
    return llm.generate(prompt, max_tokens=max_tokens, temperature=0.0, spec_type="none")


def chat_reference(llm, messages, max_tokens: int = MAX_TOKENS):
    return reference(llm, llm.tokenizer.apply_chat_template(messages), max_tokens)


def test_models_and_health(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["spec_type"] == "mtp"


def test_chat_non_streaming_matches_greedy_reference(live, serve_llm):
    ref = chat_reference(serve_llm, chat_messages(1))
    r = live.client().chat.completions.create(model="tiny", messages=chat_messages(1), max_tokens=MAX_TOKENS,
                                              temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == ref.stats["prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    spec = r.usage.model_extra["speculative"]
    assert spec["spec_type"] == "mtp" and spec["drafts"] > 0 and spec["draft_tokens"] >= spec["accepted_tokens"]


def test_chat_streaming_matches_greedy_reference(live, serve_llm):
    ref = chat_reference(serve_llm, chat_messages(2))
    stream = live.client().chat.completions.create(model="tiny", messages=chat_messages(2), max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert "speculative" in chunks[-1].usage.model_extra


def test_completions_non_streaming_and_streaming(live, serve_llm):
    client = live.client()
    ref = reference(serve_llm, "def add(a, b):\n", 12)
    r = client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    # without include_usage the last chunk carries the usage (an extra the page reads)
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    # token-id prompts and stop strings
    ids = serve_llm.tokenizer.encode("import os\n")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == reference(serve_llm, "import os\n", 8).text
    full = reference(serve_llm, "The quick brown fox", 16).text
    stop = full[5:8]
    if stop and stop.strip():
        r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=16, temperature=0,
                                      stop=[stop])
        assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_penalties_reach_the_model_and_match_plain_decoding(live, serve_llm):
    kw = dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.3)
    ref = serve_llm.generate("while True:\n", max_tokens=MAX_TOKENS, temperature=0.0, spec_type="none", **kw)
    assert ref.token_ids != reference(serve_llm, "while True:\n").token_ids  # the penalties change this output
    r = live.client().completions.create(model="tiny", prompt="while True:\n", max_tokens=MAX_TOKENS, temperature=0,
                                         presence_penalty=0.8, frequency_penalty=0.5,
                                         extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].text == ref.text  # served with MTP speculation: identical to plain decoding


def test_dry_reaches_the_model_and_matches_plain_decoding(live, serve_llm):
    dry = dict(dry_multiplier=1.5, dry_base=2.0, dry_allowed_length=1, dry_sequence_breakers=[])
    prompt = "1 2 3 1 2 3 1 2 3"  # the tiny model loops on it
    ref = serve_llm.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, spec_type="none", **dry)
    assert ref.token_ids != reference(serve_llm, prompt).token_ids  # DRY breaks the loop
    r = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body=dry)
    assert r.choices[0].text == ref.text


def test_sampling_with_seed_is_reproducible(live):
    client = live.client()
    kw = dict(model="tiny", prompt="Hello, how are", max_tokens=10, temperature=0.9, top_p=0.9, seed=1234,
              extra_body={"top_k": 50, "min_p": 0.01})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_16_concurrent_streams_each_equal_sequential_greedy(live, serve_llm):
    n = 16
    jobs = [("chat", chat_messages(i)) if i % 2 else ("completion", completion_prompt(i)) for i in range(n)]
    refs = [chat_reference(serve_llm, p) if kind == "chat" else reference(serve_llm, p) for kind, p in jobs]
    results: list = [None] * n
    errors: list = []
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        try:
            client = live.client()
            kind, p = jobs[i]
            barrier.wait(30)
            if kind == "chat":
                stream = client.chat.completions.create(model="tiny", messages=p, max_tokens=MAX_TOKENS,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
                pieces, usage = [], None
                for c in stream:
                    if c.choices:
                        pieces.append(c.choices[0].delta.content or "")
                    if c.usage:
                        usage = c.usage
            else:
                stream = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
                pieces, usage = [], None
                for c in stream:
                    if c.choices:
                        pieces.append(c.choices[0].text)
                    if c.usage:
                        usage = c.usage
            results[i] = ("".join(pieces), usage.completion_tokens)
        except Exception as e:  # reported below
            errors.append((i, repr(e)))

    before = httpx.get(live.url + "/metrics").text
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (ref, got) in enumerate(zip(refs, results)):
        assert got == (ref.text, len(ref.token_ids)), f"stream {i} ({jobs[i][0]}) differs from sequential greedy"
    after = httpx.get(live.url + "/metrics").text
    assert _metric(after, "mtpx:decode_rounds_total") > _metric(before, "mtpx:decode_rounds_total")
    # the streams really were batched: far fewer rounds than sequential decoding would need
    rounds = _metric(after, "mtpx:decode_rounds_total") - _metric(before, "mtpx:decode_rounds_total")
    assert rounds < sum(len(r.token_ids) for r in refs) / 2


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


LONG = list(range(3, 303)) * 2  # 600 token ids: longer than the tiny model's 512-token context
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": "tiny", "prompt": "hi"}
BAD = [
    ("invalid json", "chat", b'{"model": "tiny", "messages": [', 400, None),
    ("body not an object", "chat", b"[1, 2]", 400, None),
    ("messages wrong type", "chat", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("messages missing", "chat", {"model": "tiny"}, 400, "messages"),
    ("messages empty", "chat", {"model": "tiny", "messages": []}, 400, "messages"),
    ("bad role", "chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("content wrong type", "chat", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("image content", "chat", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, None),
    ("temperature wrong type", "chat", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("temperature negative", "chat", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("top_p zero", "chat", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("top_k wrong type", "chat", {**CHAT, "top_k": 1.5}, 400, "top_k"),
    ("max_tokens wrong type", "chat", {**CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens bool", "completion", {**COMP, "max_tokens": True}, 400, "max_tokens"),
    ("stream wrong type", "chat", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("stop wrong type", "completion", {**COMP, "stop": 3}, 400, "stop"),
    ("seed wrong type", "completion", {**COMP, "seed": "x"}, 400, "seed"),
    ("seed too large", "completion", {**COMP, "seed": 2 ** 70, "temperature": 1}, 400, "seed"),
    ("unknown model", "chat", {**CHAT, "model": "gpt-9"}, 404, "model"),
    ("unknown model (completions)", "completion", {**COMP, "model": "gpt-9"}, 404, "model"),
    ("max_tokens zero", "chat", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "completion", {**COMP, "max_tokens": -5}, 400, "max_tokens"),
    ("max_completion_tokens zero", "chat", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("max_tokens over the context", "completion", {**COMP, "max_tokens": 100000}, 400, "max_tokens"),
    ("prompt longer than the context", "completion", {**COMP, "prompt": LONG}, 400, "prompt"),
    ("chat longer than the context", "chat", {"model": "tiny", "messages": [
        {"role": "user", "content": "The quick brown fox jumps. " * 200}]}, 400, "messages"),
    ("token id out of range", "completion", {**COMP, "prompt": [1, 99999]}, 400, "prompt"),
    ("empty prompt", "completion", {**COMP, "prompt": ""}, 400, "prompt"),
    ("prompt wrong type", "completion", {**COMP, "prompt": {"a": 1}}, 400, "prompt"),
    ("batched prompts", "completion", {**COMP, "prompt": ["a", "b"]}, 400, "prompt"),
    ("n over the cap", "chat", {**CHAT, "n": 9}, 400, "n"),
    ("best_of > 1", "completion", {**COMP, "best_of": 3}, 400, "best_of"),
    ("top_logprobs over the cap", "chat", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("logprobs over the cap (completions)", "completion", {**COMP, "logprobs": 50}, 400, "logprobs"),
    ("tool without a name", "chat", {**CHAT, "tools": [{"type": "function", "function": {}}]}, 400,
     "tools[0].function.name"),
    ("echo", "completion", {**COMP, "echo": True}, 400, "echo"),
    ("json schema invalid", "chat", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}}, 400, "response_format.json_schema.schema"),
    ("presence penalty out of range", "chat", {**CHAT, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency penalty wrong type", "chat", {**CHAT, "frequency_penalty": "lots"}, 400, "frequency_penalty"),
    ("repetition penalty zero", "completion", {**COMP, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("dry multiplier negative", "completion", {**COMP, "dry_multiplier": -1}, 400, "dry_multiplier"),
    ("dry breakers not strings", "chat", {**CHAT, "dry_sequence_breakers": ["\n", 3]}, 400, "dry_sequence_breakers"),
    ("dry allowed length a fraction", "chat", {**CHAT, "dry_allowed_length": 1.5}, 400, "dry_allowed_length"),
]


@pytest.mark.parametrize("what,endpoint,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_with_4xx(live, what, endpoint, body, status, param):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_openai_client_raises_typed_errors(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=9)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    r = httpx.get(live.url + "/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_disconnect_mid_stream_frees_the_sequence_and_server_keeps_serving(live, monkeypatch):
    # the tiny model can now generate all 480 tokens within the client's 1 s timeout below: slow every decode round
    # by 5 ms, so the clients really do leave mid-generation (480 rounds take >= 2.4 s)
    from mtpx.engine import engine
    decode_round = engine.decode_round  # what the scheduler's Engine.decode_round runs

    def slow_round(*args, **kwargs):
        time.sleep(0.005)
        return decode_round(*args, **kwargs)
    monkeypatch.setattr(engine, "decode_round", slow_round)
    health0 = httpx.get(live.url + "/health").json()
    body = {"model": "tiny", "prompt": "def add(a, b):\n", "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", live.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines, running = [], 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    assert "[DONE]" not in line and '"error"' not in line, line
                    lines.append(line)
                    if len(lines) == 3:  # still connected: the sequence is in the running batch
                        running = httpx.get(live.url + "/health").json()["running"]
                        break
            assert running >= 1
        # leaving the loop / the block closes the connection mid-stream
    deadline = time.time() + 20
    while True:
        h = httpx.get(live.url + "/health").json()
        if h["requests_cancelled"] > health0["requests_cancelled"] and h["running"] == 0:
            break
        assert time.time() < deadline, f"sequence not freed after disconnect: {h}"
        time.sleep(0.05)
    assert h["cache_bytes"] == 0
    # the sequence stopped long before its 480 tokens
    assert h["generation_tokens"] - health0["generation_tokens"] < 480
    metrics = httpx.get(live.url + "/metrics").text
    assert _metric(metrics, "mtpx:num_requests_cancelled_total") >= 1
    # a non-streaming client that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    deadline = time.time() + 20
    while True:
        h2 = httpx.get(live.url + "/health").json()
        if h2["requests_cancelled"] > h["requests_cancelled"] and h2["running"] == 0:
            break
        assert time.time() < deadline, f"non-streaming sequence not freed after disconnect: {h2}"
        time.sleep(0.05)
    r = live.client().completions.create(model="tiny", prompt="import os\n", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_metrics_prometheus_text(live):
    live.client().completions.create(model="tiny", prompt="for i in", max_tokens=6, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    for name in ("mtpx:spec_decode_num_drafts_total", "mtpx:spec_decode_num_draft_tokens_total",
                 "mtpx:spec_decode_num_accepted_tokens_total", "mtpx:num_requests_running",
                 "mtpx:num_requests_waiting", "mtpx:num_requests_cancelled_total"):
        _metric(text, name)
    assert 'mtpx:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}' in text
    assert "mtpx:time_to_first_token_seconds_bucket" in text and "mtpx:e2e_request_latency_seconds_count" in text
    assert _metric(text, "mtpx:spec_decode_num_drafts_total") > 0
    assert _metric(text, "mtpx:spec_decode_num_draft_tokens_total") >= \
        _metric(text, "mtpx:spec_decode_num_accepted_tokens_total")


def test_api_key_required(keyed):
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="wrong").models.list()
    r = httpx.post(keyed.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    r = keyed.client(api_key=keyed.server.api_key).completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert httpx.get(keyed.url + "/health").status_code == 200  # liveness probes need no key
    assert httpx.get(keyed.url + "/").status_code == 200  # the page asks for the key itself


def test_chat_page_is_served_offline(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "/v1/chat/completions" in html
    for marker in ('src="http', "src='http", 'href="http', "href='http", "@import", "//cdn", "fonts.googleapis"):
        assert marker not in html, f"external asset reference {marker!r} in the chat page"


def test_default_bind_is_loopback():
    import argparse

    from mtpx.serve import command
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    args = p.parse_args(["--model", "x"])
    assert args.host == "127.0.0.1" and args.api_key is None
