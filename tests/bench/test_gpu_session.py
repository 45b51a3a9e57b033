"""scripts/gpu_session.sh, the one-call GPU benchmark, as a dry run on the CPU (DEVICE=cpu, the tiny shape): every
step runs and is named in the summary (the checkpoint, its q4_k GGUF, the plans, the benches of int4, of the GGUF
loaded as stored and of bf16, the peak memory), the llama.cpp peer is skipped with its reason, and what comes back
is two files: the summary and the packed results."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and GNU tar")
def test_gpu_session_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, DEVICE="cpu", SHAPE="tiny", LAYERS="4", CHECKS="0", MAX_PROMPTS="1", MAX_TOKENS="8",
               MODES="none,mtp2", RATES="0.8", OUT=str(out), WORK=str(work), PY=sys.executable, BUDGET_S="400")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=420)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("gen-tiny", "convert-tiny", "plan-tiny-bf16", "plan-tiny-int4", "plan-tiny-q4_k", "bench-tiny-int4",
                 "bench-tiny-q4_k", "peak-tiny-q4_k", "peak-tiny-int4", "bench-tiny-bf16"):
        assert f"{step}: ok" in summary, summary
    assert "peer: skipped (DEVICE=cpu" in summary and "FAILED" not in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu-session.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu-session.tar.gz") as tar:
        files = {m.name: m for m in tar.getmembers()}
        q4k = json.load(tar.extractfile(files["results/bench-tiny-q4_k/results.json"]))
        plan = json.load(tar.extractfile(files["results/plan-tiny-q4_k.out"]))
        convert = tar.extractfile(files["results/convert-tiny.log"]).read().decode()
    assert q4k["meta"]["dtype"].startswith("stored weights") and plan["dtype"] == "stored"
    assert "Q8_0" in convert  # the tiny shape's rows of 64 do not split into K-quants' 256: Q8_0, as q4_0 would
    records = {r["mode"]: r for r in q4k["records"]}
    assert set(records) == {"none", "mtp2"} and records["mtp2"]["synthetic"]
    assert records["none"]["bandwidth_fraction"] > 0  # the roofline
    assert "bench-tiny-q4_k: stored weights" in summary and "peak-tiny-q4_k: mtp2 peak" in summary
    assert not (work / "model-tiny-4").exists()  # the random weights are not kept
