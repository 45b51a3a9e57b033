"""`mtpx demo` on the bundled model: text with MTP off and on, identical, and the speed and acceptance line."""
from mtpx.cli import main


def test_demo_prints_both_runs_and_reports_identical_output(capsys):
    assert main(["demo", "--max-tokens", "40", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "--- spec_type=none" in out and "--- spec_type=mtp, k <= 6 (adaptive: this run drafted up to " in out
    assert "drafts over the first 2048 token ids" in out
    # the header says how many draft positions were used, as many as the stats line lists
    import re
    used = int(re.search(r"drafted up to (\d+) position", out).group(1))
    assert used >= 1
    assert "output identical to plain decoding" in out and "acceptance" in out
    # weights packed for the CPU kernels (AMX tiles, int8) still count as their N x K parameters
    assert "(8.2M parameters" in out
    # the defaults: plain greedy text of a model this small loops
    assert "greedy, repetition penalty 1.1, DRY multiplier 0.8" in out
