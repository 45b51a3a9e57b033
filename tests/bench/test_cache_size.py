"""`mtpx bench cache-size`: the MLA cache of DeepSeek-V3 against full K/V, figures worked out by hand from its
config, and GQA / Gated DeltaNet models for contrast."""
import argparse
import json

import pytest

from mtpx.bench import cache_size
from mtpx.bench.gen_checkpoint import shape_config


def test_deepseek_v3_caches_latent_and_rope_key_only():
    r = cache_size.cache_sizes(shape_config("deepseek-v3"))
    # 61 layers × (kv_lora_rank 512 + rope 64) bf16 values; full K/V: 61 × 128 heads × (128 + 64 + 128)
    assert r["cache_bytes_per_token"] == 61 * 576 * 2 and r["full_kv_bytes_per_token"] == 61 * 128 * 320 * 2
    assert r["attention"] == "MLA" and r["cache_over_full_kv"] == pytest.approx(0.01406, abs=1e-5)
    assert r["mtp_cache_bytes_per_token"] == 576 * 2 and r["fixed_state_bytes"] == 0


def test_gqa_caches_full_kv_and_gated_deltanet_a_fixed_state():
    glm = cache_size.cache_sizes(shape_config("glm4.5-air"))
    assert glm["cache_bytes_per_token"] == glm["full_kv_bytes_per_token"] == 46 * 2 * 8 * 128 * 2
    nxt = cache_size.cache_sizes(shape_config("qwen3-next-80b"))
    assert nxt["cache_bytes_per_token"] == 12 * 2 * 2 * 256 * 2  # every 4th of 48 layers has attention
    assert nxt["fixed_state_bytes"] > 0  # the 36 Gated DeltaNet layers' conv and recurrent states


def test_cli_writes_a_report_with_its_command(tmp_path, monkeypatch):
    p = argparse.ArgumentParser()
    cache_size.add_arguments(p)
    argv = ["--shape", "deepseek-v3-small", "--shape", "tiny", "--out", str(tmp_path / "c.json")]
    monkeypatch.setattr("sys.argv", ["mtpx", "bench", "cache-size", *argv])
    assert cache_size.main(p.parse_args(argv)) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["meta"]["command"].startswith("mtpx bench cache-size --shape deepseek-v3-small")
    assert set(report["shapes"]) == {"deepseek-v3-small", "tiny"}
    assert report["shapes"]["deepseek-v3-small"]["cache_over_full_kv"] < 0.1
