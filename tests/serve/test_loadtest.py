"""The load check's client side against the live test server (run_load itself spawns servers: benchmark only)."""
from __future__ import annotations

from mtpx.serve.loadtest import markdown_table, run_streams


def test_run_streams_and_table(live):
    port = int(live.url.rsplit(":", 1)[1])
    row = run_streams(port, 3, 8)
    assert row["completed"] == 3 and not row["errors"] and row["tokens"] == 24
    assert row["aggregate_tok_s"] > 0 and row["per_stream_tok_s"] > 0 and row["ttft_s"] > 0
    rows = [{"spec_type": s, **row, "speedup_vs_none": 1.0} for s in ("none", "mtp")]
    table = markdown_table(rows)
    assert table.count("\n") == 3 and "| 3 | mtp |" in table


def test_mtpx_serve_cli_in_a_subprocess(dense_ckpt):
    """The real `mtpx serve` command line: binds loopback, enforces --api-key, serves, stops on SIGTERM."""
    import http.client
    import json

    from mtpx.serve.loadtest import ServerProcess, stream_chat
    server = ServerProcess(str(dense_ckpt), "mtp", ["--api-key", "k1", "--served-model-name", "tiny"])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        assert r.status == 401 and json.loads(r.read())["error"]["code"] == "invalid_api_key"
        res = stream_chat(server.port, "hello", 5, api_key="k1")
        assert res.error is None and res.tokens == 5
        assert server.health()["spec_type"] == "mtp"
    finally:
        server.stop()
    assert server.proc.returncode is not None
