"""The memory planner (runners/plan.py) against models actually loaded on the CPU, its verdicts, and `mtpx plan`."""
import pytest
import torch

import mtpx
from mtpx.errors import ModelLoadError
from mtpx.models.linear import weight_bytes
from mtpx.runners import RunnerConfig
from mtpx.runners.plan import largest_context, meta_model, parse_bytes, plan, require_fit, smallest_fitting_dtype


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_weights_and_caches_match_a_loaded_model(dense_ckpt, dtype):
    llm = mtpx.LLM(dense_ckpt, dtype=dtype, runner_config=RunnerConfig.from_env(tiles=False))
    model = llm.model
    p = plan(llm.config, device="cpu", dtype=dtype, context=300, mtp_layers=1)
    loaded = weight_bytes(model)
    assert abs(p.weights_main + p.weights_mtp - loaded) <= 0.02 * loaded
    assert p.weights_mtp == weight_bytes(model.mtp)
    assert p.cache_per_sequence == model.new_state(300).nbytes() + model.new_mtp_state(300).nbytes()
    assert p.overhead == 0 and p.total >= p.weights_main + p.cache_per_sequence


def test_verdicts_name_what_would_fit(dense_ckpt):
    cfg = mtpx.LLM(dense_ckpt).config
    big = plan(cfg, device="cuda", context=2048, memory=parse_bytes("1GiB"))
    assert big.fits
    need = plan(cfg, device="cuda", context=2048).total
    assert not plan(cfg, device="cuda", context=2048, memory=need - 1).fits
    small = plan(cfg, device="cuda", context=256).total
    ctx = largest_context(cfg, (small + need) // 2, device="cuda")
    assert 256 <= ctx < 2048 and ctx % 256 == 0
    assert plan(cfg, device="cuda", context=ctx, memory=(small + need) // 2).fits
    bf16 = plan(cfg, device="cuda", context=2048, dtype="bf16").total
    assert smallest_fitting_dtype(cfg, bf16 - 1, device="cuda", context=2048) in ("int8", "int4")
    with pytest.raises(ModelLoadError, match="does not fit"):
        require_fit(cfg, 1 << 20, device="cuda")
    assert parse_bytes("24GiB") == parse_bytes("24 GB") == 24 << 30 and parse_bytes("512MiB") == 512 << 20
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")


def test_plan_command(capsys):
    from mtpx.cli import main
    assert main(["plan", "--shape", "qwen3.6-27b", "--dtype", "int4", "--ctx", "8192", "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "weights, MTP layer" in out and "fits" in out
    assert main(["plan", "--shape", "qwen3.6-27b", "--memory", "24GiB"]) == 3  # bf16 27B: no
    out = capsys.readouterr().out
    assert "bf16 weights do not fit at any context" in out and "--dtype int4 fits" in out
    assert main(["plan", "demo", "--device", "cpu", "--json"]) == 0
    assert '"weights_main"' in capsys.readouterr().out
    assert main(["plan"]) == 1


def test_a_27b_int4_model_with_its_mtp_layer_fits_a_24_gib_card_at_16k():
    """int4 at 4.625 bits a weight (models/grouped.py): the Qwen3.6-27B shape's weights, 16k tokens of caches and
    prefill, and the CUDA runtime within 24 GiB."""
    from mtpx.bench.gen_checkpoint import shape_config
    cfg = shape_config("qwen3.6-27b")
    p = plan(cfg, device="cuda", dtype="int4", context=16384, memory=parse_bytes("24GiB"))
    assert p.fits
    embedding = cfg.vocab_size * cfg.hidden_size * 2  # stays bf16
    params = sum(t.numel() for t in meta_model(cfg, 1, "bf16").parameters()) - cfg.vocab_size * cfg.hidden_size
    assert abs(p.weights_main + p.weights_mtp - embedding - params * 37 / 64) < 0.01 * params  # int4, int8 for K % 32
