"""n > 1 through the API (serve/streaming.py): the choices share one prefill, stream as chunks carrying
choices[i].index (each ending with its own finish_reason), and each equals the request of its own that it stands
for — read through the official openai client."""
from __future__ import annotations

import httpx
import pytest

MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Say something about lists."}]


def prompt_tokens_counted(live) -> int:
    """The server's counter of prefilled prompt tokens (mtpx:prompt_tokens, also in /health)."""
    return httpx.get(live.url + "/health").json()["prompt_tokens"]


def streamed_choices(stream) -> tuple[dict[int, str], dict[int, list[str]], list]:
    """Text and finish reasons per choice index, and the chunks."""
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    chunks = list(stream)
    for c in chunks:
        for ch in c.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
            if ch.finish_reason:
                finishes.setdefault(ch.index, []).append(ch.finish_reason)
    return texts, finishes, chunks


def test_n_streamed_greedy_chat_shares_one_prefill(live, serve_llm):
    client = live.client()
    single = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    before = prompt_tokens_counted(live)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                            n=3, stream=True, stream_options={"include_usage": True})
    texts, finishes, chunks = streamed_choices(stream)
    assert prompt_tokens_counted(live) - before == single.usage.prompt_tokens  # one prefill for the three choices
    assert texts == {i: single.choices[0].message.content for i in range(3)}
    assert finishes == {i: [single.choices[0].finish_reason] for i in range(3)}  # each choice ends once
    roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
    assert roles == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == single.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 3 * single.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_n_sampled_completions_equal_requests_with_derived_seeds(live, stream):
    """Choice i samples with seed + i: the request with that seed alone gives the same text."""
    client = live.client()
    kw = dict(model="tiny", prompt="def add(a, b):\n", max_tokens=MAX_TOKENS, temperature=1.0,
              extra_body={"ignore_eos": True})
    alone = [client.completions.create(**kw, seed=5 + i).choices[0].text for i in range(3)]
    before = prompt_tokens_counted(live)
    if stream:
        texts, finishes, _ = streamed_choices(client.completions.create(**kw, seed=5, n=3, stream=True))
        assert finishes == {i: ["length"] for i in range(3)}
    else:
        r = client.completions.create(**kw, seed=5, n=3)
        texts = {c.index: c.text for c in r.choices}
        assert r.usage.completion_tokens == 3 * MAX_TOKENS
    assert texts == dict(enumerate(alone)) and len(set(alone)) > 1
    assert prompt_tokens_counted(live) - before == len(live.server.llm.tokenizer.encode("def add(a, b):\n"))


@pytest.mark.parametrize("n", [0, 9])
def test_n_out_of_range_is_a_400_naming_n(live, n):
    r = httpx.post(live.url + "/v1/chat/completions", timeout=30,
                   json={"messages": MESSAGES, "max_tokens": 2, "n": n, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
