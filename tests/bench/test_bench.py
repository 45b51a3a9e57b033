"""Plumbing of `mtpx bench` on tiny models: fields present, ratios computed from the measured times, synthetic
acceptance labelled, outputs written. Not speeds."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from mtpx.bench import aggregate, costmodel, prompts, roofline, runner
from mtpx.bench.gen_checkpoint import generate_checkpoint, parameter_shapes, shape_config
from mtpx.bench.peers import llamacpp_synth_rates
from mtpx.cli import main as cli_main
from mtpx.llm import LLM

REQUIRED = {"mode", "workload", "decode_tokens_per_s", "prefill_tokens_per_s", "acceptance_rate",
            "mean_acceptance_length", "synthetic", "time_to_first_token_s", "acceptance_by_position", "speedup",
            "drafter_memory_bytes", "weight_bytes_per_token"}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "mine.json"
    path.write_text(json.dumps(["def add(a, b):\n", "The quick brown fox", "import os\n"]))
    return path


def _run(out: Path, ckpt: Path, *extra: str) -> dict:
    argv = ["bench", "--model", str(ckpt), "--out", str(out), "--repeat", "2", "--max-tokens", "10",
            "--no-roofline", *extra]
    assert cli_main(argv) == 0
    return json.loads((out / "results.json").read_text())


def _check_ratios(result: dict) -> None:
    """Every record's throughput and speedup recomputed from the raw per-generation times."""
    runs = result["runs"]
    for rec in result["records"]:
        def per_rep(mode):
            rs = [r for r in runs if r["mode"] == mode and r["workload"] == rec["workload"]
                  and r["temperature"] == rec["temperature"]]
            reps = sorted({r["repeat"] for r in rs})
            return [sum(r["decode_tokens"] for r in rs if r["repeat"] == k)
                    / sum(r["decode_s"] for r in rs if r["repeat"] == k) for k in reps]
        mine, base = per_rep(rec["mode"]), per_rep("none")
        assert rec["decode_tokens_per_s_by_repeat"] == pytest.approx(mine)
        assert rec["decode_tokens_per_s"] == pytest.approx(statistics.median(mine))
        assert rec["decode_tokens_per_s_min"] == pytest.approx(min(mine))
        speedups = [a / b for a, b in zip(mine, base)]
        assert rec["speedup"] == pytest.approx(statistics.median(speedups))
        assert rec["speedup_min"] == pytest.approx(min(speedups))
        if rec["mode"] == "none":
            assert rec["speedup"] == pytest.approx(1.0)


def test_bench_end_to_end(tmp_path, dense_ckpt, prompt_file):
    out = tmp_path / "out"
    result = _run(out, dense_ckpt, "--prompts", str(prompt_file), "--modes", "mtp2,ngram", "--temperature", "0,0.7",
                  "--no-memory")
    recs = result["records"]
    # none is added for the speedups; one record per (mode, workload, temperature)
    assert {(r["mode"], r["temperature"]) for r in recs} == {(m, t) for m in ("none", "mtp2", "ngram")
                                                             for t in (0.0, 0.7)}
    assert len(recs) == 6
    for r in recs:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["synthetic"] is False and r["workload"] == "mine" and r["generations"] == 6
    _check_ratios(result)
    mtp = next(r for r in recs if r["mode"] == "mtp2" and r["temperature"] == 0)
    assert mtp["drafts"] > 0 and len(mtp["acceptance_by_position"]) == 2
    assert mtp["mean_acceptance_length"] == pytest.approx(1 + mtp["accepted_tokens"] / mtp["drafts"])
    assert mtp["predicted_speedup"] is not None and mtp["predicted_speedup_refined"] is not None
    assert mtp["drafter_memory_bytes"] > 0
    # the MTP layer's pass over the prompt is timed: prefill including it is slower than the engine's prefill
    assert all(r["drafter_prefill_s"] > 0 for r in result["runs"] if r["mode"] == "mtp2")
    assert all(r["drafter_prefill_s"] == 0 for r in result["runs"] if r["mode"] == "none")
    assert mtp["prefill_with_drafter_tokens_per_s"] < mtp["prefill_tokens_per_s"]
    # plain decoding reads the dense weights and lm_head once per token
    model = LLM(dense_ckpt).model
    sizes = runner.WeightTraffic.sizes(model)
    none = next(r for r in recs if r["mode"] == "none")
    assert none["weight_bytes_per_token"] == pytest.approx(sizes["main_dense"] + sizes["lm_head"])
    assert result["costs"]["verify_rel"]["0"] == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    assert "| mine | mtp2 |" in md and "Cost model" in md and "SYNTHETIC" not in md
    for png in ("tokens_per_s.png", "acceptance_by_position.png", "speedup_measured_vs_predicted.png"):
        assert (out / png).stat().st_size > 1000
    assert result["meta"]["synthetic"] is False and result["meta"]["machine"]


def test_bench_synthetic_and_memory(tmp_path, dense_ckpt):
    out = tmp_path / "out"
    result = _run(out, dense_ckpt, "--workloads", "chat", "--max-prompts", "2", "--modes", "none,mtp3",
                  "--temperature", "0", "--spec-synth-rates", "1.0", "--no-costs")
    recs = {r["mode"]: r for r in result["records"]}
    assert recs["mtp3"]["synthetic"] is True and recs["mtp3"]["synthetic_rates"] == [1.0]
    assert recs["none"]["synthetic"] is False  # no drafts, nothing synthetic about plain decoding
    assert result["meta"]["synthetic"] is True and result["meta"]["synthetic_rates"] == [1.0]
    # rate 1.0: every draft accepted
    assert recs["mtp3"]["acceptance_rate"] == 1.0 and recs["mtp3"]["mean_acceptance_length"] == pytest.approx(4.0)
    md = (out / "results.md").read_text()
    assert "SYNTHETIC acceptance" in md and "| chat | mtp3 | yes |" in md
    _check_ratios(result)
    mem = result["memory"]
    assert set(mem) == {"none", "mtp3"}
    assert mem["none"]["extra_peak_bytes"] == 0
    assert mem["mtp3"]["extra_peak_bytes"] == mem["mtp3"]["footprint_bytes"] - mem["none"]["footprint_bytes"]
    assert mem["mtp3"]["drafter_memory_bytes"] > 0 and mem["none"]["drafter_memory_bytes"] == 0
    # chat prompts went through the chat template
    assert result["meta"]["workloads"]["chat"]["chat"] is True


def test_report_rerenders(tmp_path, dense_ckpt, prompt_file):
    out = tmp_path / "out"
    _run(out, dense_ckpt, "--prompts", str(prompt_file), "--modes", "none,mtp1", "--temperature", "0",
         "--no-memory", "--no-costs", "--no-plots", "--max-prompts", "1")
    (out / "results.md").unlink()
    assert cli_main(["bench", "report", str(out)]) == 0
    assert (out / "results.md").exists() and (out / "tokens_per_s.png").exists()


def test_bench_applies_the_given_sampling_settings_to_every_generation(tmp_path, dense_ckpt, prompt_file, capsys):
    out = tmp_path / "out"
    result = _run(out, dense_ckpt, "--prompts", str(prompt_file), "--modes", "none,mtp2", "--temperature", "0.7",
                  "--no-memory", "--no-costs", "--no-plots", "--max-prompts", "1", "--top-k", "20", "--top-p", "0.8",
                  "--repetition-penalty", "1.1", "--dry-multiplier", "0.8")
    settings = {"top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1, "dry_multiplier": 0.8}
    assert result["meta"]["sampling"] == settings
    md = (out / "results.md").read_text()
    assert ("Sampling settings in every generation: top_k 20, top_p 0.8, repetition_penalty 1.1, dry_multiplier 0.8."
            in md)
    cfg = runner.BenchConfig(runner.parse_modes(["mtp2"], 4), [], [0.7], sampling=settings)
    kw = runner.generation_kwargs(cfg.modes[0], cfg, 0.7, 10, 0)
    assert {k: kw[k] for k in settings} == settings and kw["temperature"] == 0.7
    capsys.readouterr()
    assert cli_main(["bench", "--model", str(dense_ckpt), "--dry-multiplier", "-1", "--out", str(out)]) != 0
    assert "dry_multiplier must be >= 0" in capsys.readouterr().err
    assert cli_main(["bench", "--model", str(dense_ckpt), "--top-p", "0.9", "--peers", "hf", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "--peers runs with temperature only" in err and "drop --top-p, or --peers" in err


def test_aggregate_from_known_times():
    modes = runner.parse_modes(["none", "mtp2"])

    def row(mode, rep, dec_s, drafts=0, acc=0, by_pos=()):
        return {"mode": mode, "workload": "w", "temperature": 0.0, "repeat": rep, "prompt_index": 0,
                "prompt_tokens": 10, "generated_tokens": 11, "prefill_s": 0.1, "time_to_first_token_s": 0.1,
                "decode_s": dec_s, "decode_tokens": 10, "drafter_prefill_s": 0.05 if mode != "none" else 0.0,
                "drafts": drafts, "drafted_tokens": 2 * drafts, "accepted_tokens": acc,
                "acceptance_by_position": list(by_pos), "draft_s": 0.0, "verify_s": 0.0,
                "drafter_memory_bytes": 0, "decode_weight_bytes": 1000}
    rows = [row("none", 0, 1.0), row("none", 1, 2.0), row("none", 2, 1.0),
            row("mtp2", 0, 0.5, 4, 6, (1.0, 0.5)), row("mtp2", 1, 0.5, 4, 6, (1.0, 0.5)),
            row("mtp2", 2, 1.0, 4, 6, (1.0, 0.5))]
    recs = {r["mode"]: r for r in aggregate.aggregate(rows, modes)}
    m = recs["mtp2"]
    assert m["decode_tokens_per_s_by_repeat"] == [20.0, 20.0, 10.0]
    assert m["decode_tokens_per_s"] == 20.0 and m["decode_tokens_per_s_min"] == 10.0
    assert m["speedup_by_repeat"] == [2.0, 4.0, 1.0] and m["speedup"] == 2.0 and m["speedup_min"] == 1.0
    assert m["acceptance_rate"] == pytest.approx(18 / 24) and m["mean_acceptance_length"] == pytest.approx(2.5)
    assert m["acceptance_by_position"] == [1.0, 0.5]
    assert m["prefill_tokens_per_s"] == pytest.approx(100.0)
    assert m["prefill_with_drafter_tokens_per_s"] == pytest.approx(10 / 0.15)
    assert m["weight_bytes_per_token"] == pytest.approx(100.0)
    assert recs["none"]["speedup"] == 1.0


def test_predictions_and_synth_rates():
    assert costmodel.expected_tokens(0.8, 3) == pytest.approx((1 - 0.8 ** 4) / 0.2)
    assert costmodel.expected_tokens(1.0, 3) == 4.0
    assert costmodel.predict(0.8, 3, 0.1) == pytest.approx(2.952 / 1.3)
    assert costmodel.predict_refined(3.0, 3, 0.1, 1.2) == pytest.approx(3.0 / 1.5)
    assert llamacpp_synth_rates([0.8], 3) == pytest.approx([0.8, 0.64, 0.512])
    assert llamacpp_synth_rates([0.8, 1.0], 3) == pytest.approx([0.8, 0.8, 0.8])


def test_greedy_mtp_predictions_use_the_draft_chain_cost():
    """Greedy MTP drafts run as one call per round: their predictions use that cost, sampled ones the step's."""
    costs = {"c_mtp": 0.4, "c_mtp_chain": 0.2, "verify_rel": {3: 1.5}}
    recs = [{"spec_type": "mtp", "policy": "fixed", "drafts": 10, "k": 3, "temperature": t, "acceptance_rate": 0.8,
             "mean_acceptance_length": 3.0} for t in (0.0, 0.7)]
    costmodel.add_predictions(recs, costs)
    assert [r["cost_c"] for r in recs] == [0.2, 0.4]
    assert recs[0]["predicted_speedup_refined"] == pytest.approx(3.0 / (1.5 + 3 * 0.2))


def test_parse_modes():
    names = [m.name for m in runner.parse_modes(["mtp1", "adaptive", "draft", "ngram4"])]
    assert names == ["none", "mtp1", "adaptive", "draft", "ngram4"]
    m = {m.name: m for m in runner.parse_modes(["mtp", "adaptive", "draft2"], adaptive_n_max=5)}
    assert (m["mtp"].k, m["adaptive"].k, m["adaptive"].policy, m["draft2"].k) == (3, 5, "adaptive", 2)
    with pytest.raises(Exception):
        runner.parse_mode("mtp0")
    with pytest.raises(Exception):
        runner.parse_mode("eagle")


def test_parse_chained_and_suffix_modes():
    m = {m.name: m for m in runner.parse_modes(["adaptive+ngram", "mtp3+suffix+ngram", "suffix6", "suffix"], 6)}
    assert (m["adaptive+ngram"].spec_type, m["adaptive+ngram"].k, m["adaptive+ngram"].policy) == \
        ("mtp,ngram", 6, "adaptive")
    assert m["mtp3+suffix+ngram"].spec().spec_type == "mtp,suffix,ngram" and m["mtp3+suffix+ngram"].k == 3
    assert (m["suffix6"].spec_type, m["suffix6"].k, m["suffix"].k) == ("suffix", 6, 3)
    for bad in ("adaptive+eagle", "none+ngram", "ngram+ngram", "adaptive+suffix+suffix"):
        with pytest.raises(Exception, match="mode"):
            runner.parse_mode(bad)


def test_parse_tree_modes():
    """treeAxBxC: an MTP draft tree (x, not commas: --modes splits at those); adaptive-treeAxBxC: the policy's."""
    m = {m.name: m for m in runner.parse_modes(["tree3x2x1", "adaptive-tree3x2x1", "tree2x2v2048"], 6)}
    assert (m["tree3x2x1"].spec().spec_draft_tree, m["tree3x2x1"].k, m["tree3x2x1"].policy) == ((3, 2, 1), 3, "fixed")
    adaptive = m["adaptive-tree3x2x1"].spec()
    assert (adaptive.spec_draft_tree, adaptive.spec_draft_n_max, adaptive.spec_draft_policy) == ((3, 2, 1), 6,
                                                                                                  "adaptive")
    assert m["tree2x2v2048"].spec().spec_draft_vocab == 2048
    for bad, message in (("tree0x2", "at least 1 branch"), ("tree40x30", "wider"), ("tree3x2+ngram", "not a tree"),
                         ("tree", "unknown mode")):
        with pytest.raises(Exception, match=message):
            runner.parse_mode(bad)


def test_shipped_prompt_sets():
    for w in prompts.load_workloads(list(prompts.WORKLOADS)):
        assert len(w.prompts) >= 20 and len(set(w.prompts)) == len(w.prompts)
        if w.name in ("code", "creative"):
            assert w.max_tokens >= 256
    assert prompts.load_workloads(["chat"])[0].chat is True


def test_cost_model_and_bandwidth(dense_ckpt):
    llm = LLM(dense_ckpt)
    costs = costmodel.measure_costs(llm.model, context=16, reps=3, max_rows=3)
    assert costs["verify_rel"][0] == pytest.approx(1.0) and set(costs["verify_rel"]) == {0, 1, 2}
    assert costs["c_mtp"] > 0 and costs["mtp_prefill_rel"] > 0 and costs["plain_step_s"] > 0
    from mtpx import kernels
    assert ("c_mtp_chain" in costs) == kernels.rowgemm_available()  # the one-call chain where the kernels run
    assert costs.get("c_mtp_chain", 1) > 0
    bw = roofline.measure_bandwidth(mbytes=32, reps=2)
    assert bw["copy_GBps"] > 0 and bw["read_GBps"] > 0 and bw["linear_bf16_GBps"] > 0
    assert bw["step_linear_1_rows_GBps"] > 0 and bw["step_linear_5_rows_GBps"] > 0
    recs = [{"weight_bytes_per_token": 2e9, "decode_tokens_per_s": 3.0}]
    roofline.add_roofline(recs, {"read_GBps": 12.0})
    assert recs[0]["achieved_GBps"] == pytest.approx(6.0) and recs[0]["bandwidth_fraction"] == pytest.approx(0.5)


def test_moe_expert_traffic(moe_ckpt):
    llm = LLM(moe_ckpt)
    sizes = runner.WeightTraffic.sizes(llm.model)
    traffic = runner.WeightTraffic(llm.model)
    llm.generate("def add(a, b):", max_tokens=2, ignore_eos=True, spec_type="none")
    traffic.bytes = 0
    ids = torch.tensor([[5]])
    state = llm.model.new_state(8)
    llm.model(ids, [state], "step")
    cfg = llm.config
    n_layers = cfg.num_hidden_layers
    expert_bytes = traffic.bytes - sizes["main_dense"]
    assert expert_bytes == n_layers * cfg.num_experts_per_tok * sizes["per_expert"]  # one token: top-k experts
    traffic.remove()


def test_gen_checkpoint(tmp_path):
    cfg = shape_config("qwen3.5-0.8b")
    n = sum(math.prod(s) for s in parameter_shapes(cfg).values())
    assert n == 584_102_208  # REFERENCE §7: 584M with a 32k vocab (MTP layer included)
    moe = shape_config("qwen3.5-moe-small")
    assert moe.is_moe and moe.num_experts_per_tok == 8 and moe.hidden_size == 1024
    info = generate_checkpoint(tmp_path / "ck", "tiny", log=lambda m: None)
    assert info["mtp_parameters"] > 0
    llm = LLM(tmp_path / "ck")
    assert llm.model.mtp is not None and llm.config.vocab_size == 512
    assert llm.model.lm_head.weight.dtype == torch.bfloat16
    out = llm.generate("hello", max_tokens=4, spec_type="mtp", spec_synth_rates=[0.5], ignore_eos=True)
    assert out.stats["generated_tokens"] == 4


def test_cost_table_shows_the_mtp_prompt_pass_without_the_draft_chain():
    """The chain is timed only where the CPU kernels run (not on CUDA): the other MTP rows must not depend on it."""
    from mtpx.bench.report import cost_table
    costs = {"context_tokens": 16, "plain_step_s": 0.01, "verify_rel": {0: 1.0, 1: 1.1}, "mtp_step_s": 0.002,
             "c_mtp": 0.2, "mtp_prefill_rel": 1.1, "prefill_tokens_per_s": 1000.0}
    table = cost_table(costs)
    assert "MTP pass over the prompt / main prefill | 1.100" in table and "draft chain" not in table


def test_report_names_the_kernels_and_whether_the_integer_dots_ran_on_vnni():
    from mtpx.bench.report import _isa
    assert _isa({"cpu_isa": "avx2", "int_dot_vnni": False}) == " (kernels avx2)"
    assert _isa({"cpu_isa": "avx2", "int_dot_vnni": True}) == " (kernels avx2, integer dots on VNNI)"
    assert _isa({"cpu_isa": "avx512"}) == " (kernels avx512)"  # reports from before int_dot_vnni was recorded
    assert _isa({}) == ""


def test_bench_json_schema_runs_each_workload_free_and_constrained(tmp_path, dense_ckpt, prompt_file, capsys):
    out = tmp_path / "out"
    schema = prompts.PROMPT_DIR / "function.schema.json"
    result = _run(out, dense_ckpt, "--prompts", str(prompt_file), "--modes", "none,mtp2", "--temperature", "0",
                  "--no-memory", "--no-costs", "--no-plots", "--max-prompts", "2", "--json-schema", str(schema))
    assert {(r["workload"], r["mode"]) for r in result["records"]} == {
        ("mine", "none"), ("mine", "mtp2"), ("mine+json", "none"), ("mine+json", "mtp2")}
    _check_ratios(result)
    meta = result["meta"]
    assert meta["json_schema"]["file"] == str(schema) and meta["json_schema"]["schema"]["type"] == "object"
    assert meta["workloads"]["mine+json"]["json_schema"] and not meta["workloads"]["mine"]["json_schema"]
    md = (out / "results.md").read_text()
    assert "### MTP with and without the JSON schema" in md and "| 0 | mine | mtp2 |" in md
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nonsense"}')
    capsys.readouterr()
    assert cli_main(["bench", "--model", str(dense_ckpt), "--json-schema", str(bad), "--out", str(out)]) != 0
    assert "--json-schema" in capsys.readouterr().err
