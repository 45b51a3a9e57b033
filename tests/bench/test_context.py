"""`mtpx bench --context`: prompts of exactly the context's length from real text, acceptance by position per
context, and each sequence's memory (main caches against the drafter's), on a tiny model. Not speeds."""
from __future__ import annotations

import json

import pytest

from mtpx.bench import context, docs_check
from mtpx.cli import main as cli_main
from mtpx.errors import RequestError
from mtpx.llm import LLM


def test_parse_contexts():
    assert context.parse_contexts("8k, 1024,1k") == [1024, 8192]
    for bad in ("", "0", "1m", "-5", "2,x"):
        with pytest.raises(RequestError, match="--context"):
            context.parse_contexts(bad)


def test_windows_have_the_length_asked_for():
    ids = list(range(100))
    assert context.windows(ids, 30, 3) == [ids[0:30], ids[30:60], ids[60:90]]  # consecutive where they fit
    spread = context.windows(ids, 60, 3)
    assert [w[0] for w in spread] == [0, 20, 40] and all(len(w) == 60 for w in spread)
    assert context.windows([1, 2, 3], 7, 1) == [[1, 2, 3, 1, 2, 3, 1]]  # a short document repeats


def test_context_workloads_and_their_refusals(dense_ckpt):
    tok = LLM(dense_ckpt).tokenizer
    ws = context.context_workloads([64, 128], tok, 512, max_prompts=2, max_tokens=16)
    assert [w.name for w in ws] == ["ctx64", "ctx128"]
    assert [[len(p) for p in w.prompts] for w in ws] == [[48, 48], [112, 112]] and ws[0].max_tokens == 16
    assert ws[0].prompts[0] != ws[0].prompts[1]
    assert tok.decode(ws[0].prompts[0][:8]).startswith("# mtpx/")  # the package's own sources
    with pytest.raises(RequestError, match=r"--context 1024: longer than the model's context of 512"):
        context.context_workloads([64, 1024], tok, 512)
    with pytest.raises(RequestError, match="longer than the 16 tokens generated"):
        context.context_workloads([16], tok, 512, max_tokens=16)


def test_bench_context_end_to_end(tmp_path, dense_ckpt):
    out = tmp_path / "out"
    argv = ["bench", "--model", str(dense_ckpt), "--out", str(out), "--context", "64,128", "--modes", "none,mtp2",
            "--temperature", "0", "--max-prompts", "2", "--max-tokens", "16", "--repeat", "1", "--no-roofline",
            "--no-plots"]
    assert cli_main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    costs = result["costs_by_context"]  # measured after each context's prompt, no prefill timed
    assert set(costs) == {"ctx64", "ctx128"} and costs["ctx128"]["context_tokens"] == 112
    assert "prefill_s" not in costs["ctx128"] and costs["ctx128"]["c_mtp"] > 0
    assert result["meta"]["contexts"] == [64, 128] and result["memory"] is None  # per-sequence bytes instead
    for r in result["runs"]:
        assert r["prompt_tokens"] + r["generated_tokens"] == int(r["workload"][3:])
    recs = {(r["workload"], r["mode"]): r for r in result["records"]}
    assert set(recs) == {(w, m) for w in ("ctx64", "ctx128") for m in ("none", "mtp2")}
    llm = LLM(dense_ckpt)
    for n in (64, 128):
        mtp, none = recs[f"ctx{n}", "mtp2"], recs[f"ctx{n}", "none"]
        assert mtp["drafts"] > 0 and len(mtp["acceptance_by_position"]) == 2
        assert mtp["verify_rel"] == costs[f"ctx{n}"]["verify_rel"]["2"]  # predicted from that context's costs
        # caches for the prompt, 16 tokens and the engine's 8 positions of room for drafts
        assert none["cache_bytes"] == mtp["cache_bytes"] == llm.model.new_state(n + 8).nbytes()
        assert none["drafter_sequence_bytes"] == 0
        # the MTP layer's cache for the same positions, plus at most 2 x 16 pending hidden states
        mtp_cache = llm.model.new_mtp_state(n + 8).nbytes()
        row = llm.model.cfg.hidden_size * 2
        assert mtp_cache <= mtp["drafter_sequence_bytes"] <= mtp_cache + 32 * row
    assert recs["ctx128", "mtp2"]["cache_bytes"] > recs["ctx64", "mtp2"]["cache_bytes"]
    md = (out / "results.md").read_text()
    assert "### Long contexts" in md and "| ctx128 | greedy (T=0) | mtp2 | 112 |" in md
    assert "drafter / main" in md and "| verify k=1 / step |" in md
    # docs_check reads each figure of a context table from the report
    doc = tmp_path / "doc.md"
    doc.write_text(f"# t\n\n{result['meta']['machine']}\n\n```sh\n{result['meta']['command']}\n```\n\n"
                   f"Report: `{out}`\n\n| workload | mode | prompt tokens | pos 1 | pos 2 | main caches MiB | "
                   "drafter per sequence MiB | drafter / main | step ms | mtp draft / step |\n" + "|---" * 10 + "|\n"
                   + "".join(f"| {w} | {m} | {r['prompt_tokens_mean']:.0f} | " + (
                       " | ".join(f"{a:.2f}" for a in r["acceptance_by_position"]) if m != "none" else "– | –")
                             + f" | {r['cache_bytes'] / 2**20:.1f} | "
                             + (f"{r['drafter_sequence_bytes'] / 2**20:.1f} | "
                                f"{r['drafter_sequence_bytes'] / r['cache_bytes']:.3f}" if m != "none" else "– | –")
                             + f" | {1000 * costs[w]['plain_step_s']:.2f} | "
                             + f"{costs[w].get('c_mtp_chain', costs[w]['c_mtp']):.2f} |\n"
                             for (w, m), r in recs.items()))
    res = docs_check.check_file(tmp_path, doc, strict=True)
    assert res.errors == [] and res.cells == 4 * 8


def test_bench_context_too_long_for_the_model_fails_naming_the_flag(tmp_path, dense_ckpt, capsys):
    argv = ["bench", "--model", str(dense_ckpt), "--out", str(tmp_path), "--context", "1k", "--no-costs"]
    assert cli_main(argv) == 1
    assert "--context 1024: longer than the model's context of 512" in capsys.readouterr().err
