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
