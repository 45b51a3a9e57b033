"""Ranks as processes: `mtpx serve --tensor-parallel 2` streams and stops cleanly; a lost rank makes the server
answer 503 and every process exit within seconds, naming the rank; `torchrun -m mtpx` runs the same model."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ENV = dict(os.environ, MTPX_THREADS="1", PYTHONUNBUFFERED="1")


def children(pid: int) -> list[int]:
    return [int(c) for p in Path(f"/proc/{pid}/task").iterdir() for c in (p / "children").read_text().split()]


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its new parent counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.05)


@pytest.fixture(params=[["--tensor-parallel", "2"]])
def server(request, dense_ckpt):
    """A `mtpx serve --tensor-parallel 2` process (or another split, by indirect parametrization) and its URL, up
    and answering."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "mtpx", "serve", "--model", str(dense_ckpt), "--port", str(port),
                          *request.param, "--log-level", "warning", "--shutdown-timeout", "2",
                          "--spec-draft-policy", "fixed"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert p.poll() is None, p.stderr.read()
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_until(up, 120, "the server did not start")
        yield p, url
    finally:
        for pid in [p.pid, *(children(p.pid) if not gone(p.pid) else [])]:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("server", [["--tensor-parallel", "2"], ["--split-layers", "2"]], indirect=True,
                         ids=["tensor", "layers"])
def test_streams_and_stops_cleanly(server):
    p, url = server
    [worker] = children(p.pid)
    body = {"prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0}
    whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0, p.stderr.read()
    wait_until(lambda: gone(worker), 10, "rank 1 did not stop with the server")


def test_lost_worker_gets_503_then_everything_exits(server):
    p, url = server
    [worker] = children(p.pid)
    os.kill(worker, signal.SIGKILL)
    time.sleep(0.5)  # the watch polls every 0.2 s; the server keeps answering for 3 s
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "rank_lost", r.text
    assert p.wait(15) != 0
    assert "rank 1 exited" in p.stderr.read()


def test_lost_rank_0_stops_the_worker(server):
    p, _ = server
    [worker] = children(p.pid)
    p.kill()
    wait_until(lambda: gone(worker), 10, "rank 1 outlived rank 0")


def test_torchrun_runs_the_same_model(dense_ckpt):
    args = ["-m", "mtpx", "run", "--model", str(dense_ckpt), "--prompt", "def add(a, b):", "--max-tokens", "12",
            "--temperature", "0"]
    one = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=120)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args,
                            "--tensor-parallel", "2"], env=ENV, capture_output=True, text=True, timeout=180)
    assert ranks.returncode == 0, ranks.stderr[-12000:]  # the failing rank's traceback comes before torchrun's summary
    assert ranks.stdout == one.stdout and one.stdout.strip()
