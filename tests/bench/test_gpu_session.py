"""scripts/gpu_session.sh, the one-call GPU benchmark, as a dry run on the CPU (DEVICE=cpu, the tiny shape): every
step runs and is named in the summary (the checkpoint, its q4_k GGUF, the plans, the benches of int4, of the GGUF
loaded as stored and of bf16, the peak memory), llama.cpp's server (a stand-in here) runs on the same GGUF in the
same sitting as mtpx's modes, and what comes back is two files: the summary and the packed results."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# llama-server's HTTP surface as mtpx bench's peer uses it (/health, /completion with its timings)
STAND_IN = """#!{python}
import http.server, json, sys
if "--version" in sys.argv:
    print("version: 0 (stand-in)")
    sys.exit(0)
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self.reply({{"status": "ok"}})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = req["n_predict"]
        self.reply({{"timings": {{"predicted_n": n, "predicted_ms": 2.0 * n, "prompt_n": len(req["prompt"]),
                                 "prompt_ms": 1.0}}}})
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and GNU tar")
def test_gpu_session_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    server = tmp_path / "llama-server"
    server.write_text(STAND_IN.format(python=sys.executable))
    server.chmod(0o755)
    env = dict(os.environ, DEVICE="cpu", SHAPE="tiny", LAYERS="4", CHECKS="0", MAX_PROMPTS="1", MAX_TOKENS="8",
               MODES="none,mtp2", RATES="0.8", OUT=str(out), WORK=str(work), PY=sys.executable, BUDGET_S="400",
               LLAMA_SERVER=str(server), PEER_MODES="none")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=420)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("gen-tiny", "convert-tiny", "plan-tiny-bf16", "plan-tiny-int4", "plan-tiny-q4_k", "bench-tiny-int4",
                 "bench-tiny-q4_k", "peak-tiny-q4_k", "peak-tiny-int4", "bench-tiny-bf16"):
        assert f"{step}: ok" in summary, summary
    assert "peer: " + str(server) in summary and "FAILED" not in summary
    assert "peer-tiny" not in summary  # it ran within bench-tiny-q4_k: no second load of the GGUF for it
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
    assert [(p["engine"], p["mode"]) for p in q4k["peers"]] == [("llama.cpp", "none")]  # beside mtpx, same sitting
    assert q4k["peers"][0]["decode_tokens_per_s"] == pytest.approx(500)  # the stand-in's 2 ms a token
    assert "bench-tiny-q4_k: stored weights" in summary and "peak-tiny-q4_k: mtp2 peak" in summary
    assert not (work / "model-tiny-4").exists()  # the random weights are not kept
