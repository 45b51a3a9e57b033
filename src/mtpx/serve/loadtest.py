"""Load check: tokens/s aggregate and per stream at N concurrent streaming clients, speculation on and off.

    python -m mtpx.serve.loadtest --model demo [--streams 1 4 8 16] [--spec-types none mtp] [--max-tokens 128]
                                  [--workload chat|code] [--repeats 3]

For each speculation setting it starts a real `mtpx serve` in a subprocess on a free loopback port, warms it up, then
for each N fires N concurrent streaming requests (--workload chat: /v1/chat/completions with distinct questions;
code: /v1/completions continuing distinct Python snippets; greedy, `ignore_eos` so every stream produces exactly
--max-tokens tokens) and measures, per stream, tokens / (last token - request sent) and
the decode rate after the first token, and in aggregate, all tokens / wall time. Prints a markdown table.
Client side uses only the standard library (http.client), so the server process is the only one doing model work.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash table is in a few sentences.",
    "Write a short story about a robot learning to paint.",
    "List five tips for writing clean code.",
    "What is the difference between a list and a tuple in Python?",
    "Write a function that checks whether a string is a palindrome.",
    "Describe the water cycle.",
    "Write a Python class for a simple bank account.",
    "Explain recursion to a beginner.",
    "Write a haiku about autumn.",
    "How does binary search work?",
    "Write a function that merges two sorted lists.",
    "Summarize the rules of chess briefly.",
    "Write a loop that prints the squares of the numbers 1 to 10.",
    "What are the benefits of unit tests?",
    "Write a Python function that counts the words in a text.",
]


CODE_PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    \"\"\"A last-in first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "def read_lines(path):\n    \"\"\"Return the lines of a text file.\"\"\"\n",
    "import re\n\n_WORD = re.compile(r'\\w+')\n\n\ndef count_words(text):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __repr__(self):\n",
    "import json\n\n\ndef load_config(path, defaults=None):\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items)\n",
    "import collections\n\n\ndef most_common(words, n=10):\n",
    "def _parse_args(args):\n    import argparse\n    parser = argparse.ArgumentParser(",
    "class Timer:\n    \"\"\"Context manager that measures elapsed time.\"\"\"\n\n    def __enter__(self):\n",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n",
    "import threading\n\n\nclass Counter:\n    def __init__(self):\n        self._lock = threading.Lock()\n",
    "def flatten(nested):\n    \"\"\"Yield the items of nested lists in order.\"\"\"\n",
    "import os.path\n\n\ndef find_files(root, suffix):\n",
    "def is_palindrome(s):\n",
]


@dataclass
class StreamResult:
    tokens: int = 0
    sent: float = 0.0
    first: float = 0.0
    last: float = 0.0
    usage: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def tok_per_s(self) -> float:
        return self.tokens / (self.last - self.sent) if self.last > self.sent else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        """Server-measured decode rate after the first token (exact even when tokens decode to no text)."""
        return float(self.usage.get("speculative", {}).get("decode_tokens_per_s", 0.0))

    @property
    def ttft(self) -> float:
        """Server-measured time from arrival to the first token."""
        return float(self.usage.get("speculative", {}).get("time_to_first_token_s", self.first - self.sent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_chat(port: int, prompt: str, max_tokens: int, ignore_eos: bool = True, temperature: float = 0.0,
                api_key: str | None = None, timeout: float = 600, endpoint: str = "chat") -> StreamResult:
    """One streaming request; endpoint "chat" (prompt = the user message) or "completions" (raw prompt)."""
    body = {"max_tokens": max_tokens, "temperature": temperature, "stream": True, "ignore_eos": ignore_eos,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    res = StreamResult()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        res.sent = time.perf_counter()
        conn.request("POST", "/v1/chat/completions" if endpoint == "chat" else "/v1/completions", json.dumps(body),
                     headers)
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return res
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                res.error = chunk["error"]["message"]
                break
            now = time.perf_counter()
            usage = chunk.get("usage") or {}
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            if usage:
                res.usage = usage
            # a token arrived: text, or a usage count (continuous stats) when the tokens decode to no text yet
            if (choice.get("delta") or {}).get("content") or choice.get("text") or usage.get("completion_tokens", 0) >= 1:
                if not res.first:
                    res.first = now
                res.last = now
            if choice.get("finish_reason"):
                res.last = now
        res.tokens = res.usage.get("completion_tokens", 0)
        if not res.tokens or not res.first:
            res.error = res.error or "no tokens received"
    except Exception as e:  # reported in the table
        res.error = repr(e)
    finally:
        conn.close()
    return res


def run_streams(port: int, n: int, max_tokens: int, ignore_eos: bool = True, prompts: list[str] | None = None,
                api_key: str | None = None, endpoint: str = "chat") -> dict:
    prompts = prompts or (PROMPTS if endpoint == "chat" else CODE_PROMPTS)
    results = [StreamResult() for _ in range(n)]
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = stream_chat(port, prompts[i % len(prompts)], max_tokens, ignore_eos, api_key=api_key,
                                 endpoint=endpoint)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r.error for r in results if r.error]
    ok = [r for r in results if not r.error]
    tokens = sum(r.tokens for r in ok)
    wall = max((r.last for r in ok), default=0) - min((r.sent for r in ok), default=0)
    spec = [r.usage.get("speculative", {}) for r in ok]
    drafted = sum(s.get("draft_tokens", 0) for s in spec)
    accepted = sum(s.get("accepted_tokens", 0) for s in spec)
    drafts = sum(s.get("drafts", 0) for s in spec)
    return {
        "streams": n, "completed": len(ok), "errors": errors[:3], "tokens": tokens, "wall_s": wall,
        "aggregate_tok_s": tokens / wall if wall > 0 else 0.0,
        "per_stream_tok_s": statistics.mean(r.tok_per_s for r in ok) if ok else 0.0,
        "per_stream_tok_s_min": min((r.tok_per_s for r in ok), default=0.0),
        "per_stream_decode_tok_s": statistics.mean(r.decode_tok_per_s for r in ok) if ok else 0.0,
        "ttft_s": statistics.mean(r.ttft for r in ok) if ok else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
    }


class ServerProcess:
    """`mtpx serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, spec_type: str, extra: list[str] | None = None, max_num_seqs: int = 32,
                 startup_timeout: float = 600):
        self.port = free_port()
        cmd = [sys.executable, "-m", "mtpx.cli", "serve", "--model", model, "--port", str(self.port),
               "--spec-type", spec_type, "--max-num-seqs", str(max_num_seqs), "--log-level", "warning",
               "--no-generation-config", *(extra or [])]  # requests carry the load's own sampling
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mtpx serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("mtpx serve did not come up")
            time.sleep(0.2)

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_load(model: str = "demo", streams=(1, 4, 8, 16), spec_types=("none", "mtp"), max_tokens: int = 128,
             ignore_eos: bool = True, prompts: list[str] | None = None, spec_args: list[str] | None = None,
             warmup_tokens: int = 32, repeats: int = 1, log=None, endpoint: str = "chat") -> list[dict]:
    """Rows of {spec_type, streams, aggregate_tok_s, per_stream_tok_s, ...}, one per (spec_type, N).

    One server per speculation setting, all started up front (an idle server uses no CPU); the settings are measured
    interleaved (for each N and repeat: none, then mtp, ...) so that drifting load from other processes on the
    machine hits them alike (the order alternates between repeats). With repeats > 1 the run with the median aggregate
    is kept for each point."""
    servers = {}
    try:
        for spec in spec_types:
            servers[spec] = ServerProcess(model, spec, spec_args, max_num_seqs=max(max(streams), 1))
        for spec, server in servers.items():  # warm up the kernels and the draft policy's cost tables
            for n in sorted(set(streams)):
                run_streams(server.port, n, warmup_tokens, ignore_eos, prompts, endpoint=endpoint)
        runs: dict[tuple[str, int], list[dict]] = {}
        for n in streams:
            for rep in range(repeats):
                order = list(servers.items())
                for spec, server in (order if rep % 2 == 0 else order[::-1]):  # ABBA: cancels drifting load
                    row = run_streams(server.port, n, max_tokens, ignore_eos, prompts, endpoint=endpoint)
                    row["load_avg_1m"] = os.getloadavg()[0]
                    runs.setdefault((spec, n), []).append(row)
        rows = []
        for (spec, n), rs in runs.items():
            aggs = [r["aggregate_tok_s"] for r in rs]
            row = {"spec_type": spec, **sorted(rs, key=lambda r: r["aggregate_tok_s"])[len(rs) // 2],
                   "aggregate_runs": aggs}
            rows.append(row)
            if log:
                log(row)
    finally:
        for server in servers.values():
            server.stop()
    base = {r["streams"]: r["aggregate_tok_s"] for r in rows if r["spec_type"] == "none"}
    for r in rows:
        r["speedup_vs_none"] = r["aggregate_tok_s"] / base[r["streams"]] if base.get(r["streams"]) else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| streams | speculation | aggregate tok/s | per-stream tok/s (mean / min) | per-stream decode tok/s | "
            "TTFT s | acceptance | mean acc. length | vs none |")
    lines = [head, "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: (r["streams"], r["spec_type"] != "none", r["spec_type"])):
        vs = f"{r['speedup_vs_none']:.2f}x" if r.get("speedup_vs_none") else "–"
        acc = f"{r['acceptance_rate']:.0%}" if r["spec_type"] != "none" else "–"
        mal = f"{r['mean_acceptance_length']:.2f}" if r["spec_type"] != "none" else "–"
        err = f" ({len(r['errors'])} errors)" if r["errors"] else ""
        lines.append(f"| {r['streams']} | {r['spec_type']}{err} | {r['aggregate_tok_s']:.1f} | "
                     f"{r['per_stream_tok_s']:.1f} / {r['per_stream_tok_s_min']:.1f} | "
                     f"{r['per_stream_decode_tok_s']:.1f} | {r['ttft_s']:.2f} | {acc} | {mal} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtpx.serve.loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--spec-types", nargs="+", default=["none", "mtp"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--workload", choices=["chat", "code"], default="chat",
                    help="chat: /v1/chat/completions with questions; code: /v1/completions continuing Python code")
    ap.add_argument("--repeats", type=int, default=1, help="runs per point; the median (by aggregate) is kept")
    ap.add_argument("--no-ignore-eos", action="store_true", help="let streams stop at end-of-sequence")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER,
                    help="after --: extra `mtpx serve` flags, e.g. -- --spec-draft-n-max 2")
    a = ap.parse_args(argv)
    extra = [x for x in a.serve_args if x != "--"]
    t0 = time.time()
    load0 = os.getloadavg()
    rows = run_load(a.model, a.streams, a.spec_types, a.max_tokens, not a.no_ignore_eos, spec_args=extra,
                    repeats=a.repeats, endpoint="chat" if a.workload == "chat" else "completions",
                    log=lambda r: print(f"  {r['spec_type']:>5} x{r['streams']:<3} {r['aggregate_tok_s']:8.1f} tok/s "
                                        f"aggregate, {r['per_stream_tok_s']:.1f} per stream", file=sys.stderr))
    print(markdown_table(rows))
    print(f"\n{a.max_tokens} tokens per stream (ignore_eos={not a.no_ignore_eos}), greedy, {a.workload} workload; "
          f"{os.cpu_count()} CPUs; load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"{time.time() - t0:.0f} s.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
