"""Per-request speculation stats in the API's usage block (`"spec_stats": true` or `X-Spec-Stats: true`), for a
server drafting with a chain (suffix drafting with a store of earlier outputs, then MTP)."""
import json

import httpx
import pytest

import mtpx
from conftest import LiveServer
from mtpx.engine.params import SpecConfig
from mtpx.serve.api import spec_stats
from mtpx.serve.app import Server

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]


@pytest.fixture(scope="module")
def chained(dense_ckpt):
    server = Server(mtpx.LLM(dense_ckpt), model_name="tiny",
                    spec=SpecConfig("mtp,suffix", spec_draft_n_max=4, spec_draft_policy="fixed",
                                    spec_suffix_cache=4096))
    s = LiveServer(server)
    yield s
    s.stop()


def post(live, body: dict, headers: dict | None = None, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(live.url + path, json={"model": "tiny", "temperature": 0, "ignore_eos": True, **body},
                      headers=headers, timeout=60)


def test_asked_for_in_the_body_or_a_header(chained, serve_llm):
    plain = post(chained, {"prompt": PROMPT, "max_tokens": 24}).json()
    assert "spec_stats" not in plain["usage"] and plain["usage"]["speculative"]["spec_type"] == "mtp,suffix"
    ref = serve_llm.generate(PROMPT, max_tokens=24, spec_type="none", ignore_eos=True)
    for body, headers in (({"spec_stats": True}, None), ({}, {"X-Spec-Stats": "true"})):
        r = post(chained, {"prompt": PROMPT, "max_tokens": 24, **body}, headers)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["text"] == ref.text  # chained drafting is lossless through the server too
        s = out["usage"]["spec_stats"]
        assert s["spec_type"] == "mtp,suffix" and set(s["by_drafter"]) <= {"suffix", "mtp"} and s["by_drafter"]
        assert s["drafts"] == sum(d["drafts"] for d in s["by_drafter"].values()) > 0
        assert s["accepted_tokens"] == sum(s["accepted_by_position"]) <= s["drafted_tokens"]
        assert s["drafted_tokens"] == sum(s["drafted_by_position"])
        assert len(s["acceptance_by_position"]) == len(s["drafted_by_position"]) <= 4
        assert s["drafts"] == out["usage"]["speculative"]["drafts"]


def test_streamed_with_include_usage_and_chat(chained):
    body = {"messages": [{"role": "user", "content": "a b a b a b"}], "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}, "spec_stats": True}
    with httpx.stream("POST", chained.url + "/v1/chat/completions", json={"model": "tiny", "temperature": 0, **body},
                      timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["spec_stats"]["drafts"] == usage["speculative"]["drafts"]


def test_n_choices_add_up_and_a_bad_value_is_a_400(chained):
    out = post(chained, {"prompt": PROMPT, "max_tokens": 12, "n": 2, "spec_stats": True}).json()
    s = out["usage"]["spec_stats"]
    assert s["drafts"] == sum(d["drafts"] for d in s["by_drafter"].values())
    r = post(chained, {"prompt": PROMPT, "max_tokens": 4, "spec_stats": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "spec_stats"


def test_spec_stats_sums_choices_per_drafter():
    one = {"spec_type": "ngram,mtp", "by_drafter": {
        "ngram": {"drafts": 2, "drafted_tokens": 5, "accepted_tokens": 3, "drafted_by_position": [2, 2, 1],
                  "accepted_by_position": [2, 1, 0]},
        "mtp": {"drafts": 1, "drafted_tokens": 1, "accepted_tokens": 0, "drafted_by_position": [1],
                "accepted_by_position": [0]}}}
    s = spec_stats([one, one])
    assert (s["drafts"], s["drafted_tokens"], s["accepted_tokens"]) == (6, 12, 6)
    assert s["drafted_by_position"] == [6, 4, 2] and s["acceptance_by_position"] == [4 / 6, 2 / 4, 0.0]
    assert s["by_drafter"]["ngram"]["mean_acceptance_length"] == 1 + 6 / 4
    assert spec_stats([{"spec_type": "none", "by_drafter": {}}])["drafts"] == 0
