"""`mtpx bench --tensor-parallel 2` / `--split-layers 2`: per mode, a round's time in collectives and the bytes they
moved, and what each rank's pass reads."""
import json

import pytest
import torch

from mtpx.cli import main as cli_main


@pytest.mark.parametrize("split", [["--tensor-parallel", "2"], ["--split-layers", "2"]], ids=["tensor", "layers"])
def test_bench_reports_the_collectives(tmp_path, dense_ckpt, split):
    threads = torch.get_num_threads()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def add(a, b):\n", "import os\n"]))
    out = tmp_path / "out"
    try:
        assert cli_main(["bench", "--model", str(dense_ckpt), "--prompts", str(prompts), "--modes", "none,mtp2",
                         "--temperature", "0", "--max-tokens", "12", "--repeat", "1", "--no-memory", "--no-costs",
                         "--no-roofline", "--no-plots", "--out", str(out), *split]) == 0
    finally:
        torch.set_num_threads(threads)  # rank 0 ran on cores / ranks threads
    result = json.loads((out / "results.json").read_text())
    parallel = result["meta"]["parallel"]
    assert parallel["ranks"] == 2 and parallel["backend"] == "gloo"
    sizes = parallel["rank_weight_bytes"]
    assert len(sizes) == 2 and all(s > 0 for s in sizes)
    if split[0] == "--tensor-parallel":
        assert sizes[0] == sizes[1]  # the test model's vocabulary and heads split evenly
    for rec in result["records"]:
        assert rec["rounds"] > 0 and 0 < rec["collective_s_per_round"] < rec["round_s"]
        assert rec["collective_bytes_per_round"] > 0
    assert "### Over several ranks" in (out / "results.md").read_text()
