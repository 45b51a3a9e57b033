"""Q4_K / Q6_K written by mtpx (loading/kquants.py, `mtpx convert --outtype q4_k`): gguf-py's decoder (the authority
on llama.cpp's layout) reads the blocks back as the weights within a 4- / 6-bit error no worse than mtpx's own int4;
mtpx's own decoder (loading/gguf_blocks.py) agrees with it; odd rows (zeros, constants, one sign, outliers) stay
exact or close; bad input is refused by name; a converted model has llama.cpp's Q4_K_S mix (simplified), stays close
to the checkpoint, loads with its blocks as stored and speculates losslessly, dense and MoE."""
import numpy as np
import pytest
import torch
from gguf import GGUFReader, LlamaFileType
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize as gguf_quantize

from mtpx.errors import ModelLoadError
from mtpx.loading.gguf_blocks import _k_scales, block_weight
from mtpx.loading.kquants import quantize
from mtpx.models.grouped import Int4Weight

from tests.loading.test_gguf_blocks import needs_kernel
from tests.loading.test_gguf_llama_cpp import _k_quant_checkpoint


def _rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def _decoded(x: torch.Tensor, qtype: str) -> np.ndarray:
    return dequantize(quantize(x, qtype), Q[qtype]).reshape(x.shape)


@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_round_trip_error_is_that_of_4_and_6_bits(dist):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 1024, generator=g) * 0.02
    if dist == "heavy":  # outliers, as real weights have
        w = w * torch.distributions.StudentT(3.0).sample((96, 1024)).abs().clamp(max=30)
    int4 = _rms(Int4Weight(w).dequantize(slice(None)), w)
    q4_0 = _rms(dequantize(gguf_quantize(w.numpy(), Q.Q4_0), Q.Q4_0).reshape(w.shape), w)
    q4_k, q6_k = _rms(_decoded(w, "Q4_K"), w), _rms(_decoded(w, "Q6_K"), w)
    # measured (normal): Q4_K 0.91 of int4's error, Q6_K 0.22, Q4_0 1.09
    assert q4_k <= 1.0 * int4 and q4_k < q4_0
    assert q6_k <= 0.3 * int4


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_mtpx_decoder_reads_the_blocks_as_gguf_py_does(qtype):
    w = torch.randn(40, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    data = quantize(w, qtype)
    assert torch.equal(block_weight(data, qtype, (40, 512)).dequantize(slice(None)),
                       torch.from_numpy(dequantize(data, Q[qtype]).reshape(40, 512).copy()))


def test_q4_k_scales_are_packed_as_llama_cpp_unpacks_them():
    # sub-blocks whose ranges grow, so that the 6-bit scales and mins run over the whole 0..63 range
    g = torch.Generator().manual_seed(2)
    spans = torch.linspace(0.1, 1.0, 8).repeat_interleave(32)
    w = (torch.rand(4, 256, generator=g) - 0.7) * spans
    blocks = quantize(w, "Q4_K").reshape(4, 144)
    sc, m = _k_scales(blocks[:, 4:16])
    assert (sc[:, -1] == 63).all() and (np.diff(sc.astype(int), axis=1) >= 0).all()  # the largest span: sc 63
    assert (m[:, -1] == 63).all() and (sc[:, 0] < 16).all()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_odd_rows(qtype):
    zero, const = torch.zeros(1, 256), torch.full((1, 256), -0.5)
    assert (_decoded(zero, qtype) == 0).all()
    assert np.allclose(_decoded(const, qtype), -0.5, atol=2e-3)
    for row in (torch.linspace(0.01, 1, 256)[None], -torch.linspace(0.01, 1, 256)[None]):  # one sign
        assert _rms(_decoded(row, qtype), row) < (0.03 if qtype == "Q4_K" else 0.008)
    spike = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)) * 0.01
    spike[0, 7] = 5.0
    back = _decoded(spike, qtype)
    assert abs(back[0, 7] - 5.0) < 0.01  # the outlier keeps its value
    # the other sub-blocks' 6- / 8-bit scales are fractions of the outlier's, so they keep little resolution (as in
    # llama.cpp's own files), but stay within their own magnitude
    rest = spike[:, 32:]
    assert _rms(back[:, 32:], rest) < 1.5 * _rms(rest, 0)


def test_stacks_keep_their_leading_dims_and_bad_input_is_refused():
    x = torch.randn(3, 5, 512)
    assert quantize(x, "Q4_K").shape == (3, 5, 2 * 144) and quantize(x, "Q6_K").shape == (3, 5, 2 * 210)
    with pytest.raises(ModelLoadError, match=r"blk\.0\.x: rows of 300 weights do not split into Q4_K's"):
        quantize(torch.zeros(2, 300), "Q4_K", name="blk.0.x")
    bad = torch.zeros(2, 256)
    bad[1, 3] = float("nan")
    with pytest.raises(ModelLoadError, match=r"w holds non-finite values"):
        quantize(bad, "Q6_K", name="w")
    with pytest.raises(ModelLoadError, match=r"no K-quant quantizer for Q5_K"):
        quantize(bad, "Q5_K")
    with pytest.raises(ModelLoadError, match=r"overflows fp16"):
        quantize(torch.full((1, 256), 1e9), "Q4_K")


def _libggml():
    """llama.cpp's libggml-base (its reference quantizers): $MTPX_LIBGGML, or the one llama-cpp-python ships."""
    import ctypes
    import os
    from pathlib import Path
    path = os.environ.get("MTPX_LIBGGML")
    if not path:
        try:
            import llama_cpp
        except ImportError:
            return None
        found = sorted(Path(llama_cpp.__file__).parent.rglob("libggml-base.so*"))
        path = str(found[0]) if found else None
    return ctypes.CDLL(path) if path else None


@pytest.mark.parametrize("qtype,size", [("Q4_K", 144), ("Q6_K", 210)])
def test_blocks_are_llama_cpp_reference_blocks(qtype, size):
    """Against llama.cpp's own quantize_row_*_ref (where a libggml is at hand, e.g. MTPX_LIBGGML=.../libggml-base.so
    of a llama.cpp build): the same blocks but where float sums in another order tip a choice (measured 97 %)."""
    import ctypes
    lib = _libggml()
    if lib is None:
        pytest.skip("no libggml-base (set MTPX_LIBGGML, or install llama-cpp-python)")
    w = torch.randn(128, 2048, generator=torch.Generator().manual_seed(5)) * 0.02
    ref = np.zeros((128, 2048 // 256 * size), np.uint8)
    fn = getattr(lib, f"quantize_row_{qtype[:2].lower()}_K_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(np.ascontiguousarray(w.numpy()).ctypes.data, ref.ctypes.data, w.numel())
    ours = quantize(w, qtype)
    assert (ours.reshape(-1, size) == ref.reshape(-1, size)).all(1).mean() >= 0.9
    assert _rms(_decoded(w, qtype), w) <= 1.01 * _rms(dequantize(ref, Q[qtype]).reshape(w.shape), w)


# ---------------------------------------------------------------- mtpx convert --outtype q4_k

@pytest.fixture(scope="module")
def q4_k_files(tmp_path_factory):
    """(checkpoint, its q4_k GGUF) for the dense and MoE K-quant-ready tiny models."""
    from mtpx.loading import load_checkpoint
    from mtpx.loading.convert import write_gguf
    root = tmp_path_factory.mktemp("q4k")
    files = {}
    for moe in (False, True):
        src = _k_quant_checkpoint(root, moe)
        out = root / f"{'moe' if moe else 'dense'}-q4_k.gguf"
        write_gguf(load_checkpoint(src), out, "q4_k")
        files[moe] = (src, out)
    return files


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_convert_q4_k_types_and_values(q4_k_files, moe):
    from mtpx.loading import build_model, load_checkpoint
    from mtpx.loading.convert import gguf_tensors
    from tests.loading.test_gguf import forward_both
    src, path = q4_k_files[moe]
    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_S
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q6_K
    assert types["blk.2.attn_q.weight"] == Q.Q4_K and types["blk.0.ssm_out.weight"] == Q.Q4_K
    assert types["blk.4.nextn.eh_proj.weight"] == Q.Q4_K  # the MTP layer too
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.ssm_conv1d.weight"] == Q.F32
    if moe:
        assert types["blk.0.ffn_down_exps.weight"] == Q.Q4_K and types["blk.0.ffn_gate_inp.weight"] == Q.F32
    else:
        assert types["blk.0.ffn_down.weight"] == Q.Q4_K
    want = dict(gguf_tensors(load_checkpoint(src), "f32"))  # the checkpoint in the file's layout
    for t in reader.tensors:  # each matrix within 4 / 6 bits' error (measured 7.2 % / 1.8 % of its RMS)
        if t.tensor_type in (Q.Q4_K, Q.Q6_K):
            w = want[t.name].numpy()
            got = dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
            assert _rms(got, w) <= (0.08 if t.tensor_type == Q.Q4_K else 0.025) * _rms(w, 0), t.name
    ref = build_model(load_checkpoint(src), torch.float32)
    got = build_model(load_checkpoint(path), torch.float32)  # dequantized by gguf-py
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(2))
    for a, b in zip(forward_both(ref, ids), forward_both(got, ids)):
        rel = ((a - b).norm() / a.norm()).item()
        # the random model amplifies weight errors (and the MoE's routing flips): measured dense 0.18-0.24 (q4_0
        # 0.27-0.34, q8_0 0.02), MoE 0.25-0.33 (q4_0 0.34-0.45)
        assert 0.05 < rel <= (0.4 if moe else 0.3), rel


@needs_kernel
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_convert_q4_k_loads_as_stored_and_speculates_losslessly(q4_k_files, moe):
    import mtpx
    from mtpx.runners import STORED, RunnerConfig
    llm = mtpx.LLM(q4_k_files[moe][1], runner_config=RunnerConfig.from_env(tiles=False))
    assert llm.quantization == STORED
    prompt = llm.tokenizer.encode("def add(a, b):")
    plain = llm.generate(prompt, max_tokens=24, spec_type="none").token_ids
    assert llm.generate(prompt, max_tokens=24, spec_type="mtp", spec_draft_n_max=3).token_ids == plain


def test_the_cli_offers_q4_k():
    import argparse

    from mtpx.loading.convert import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--to", "gguf", "in", "out.gguf", "--outtype", "q4_k"]).outtype == "q4_k"
    assert "Q6_K" in p.format_help()


def test_rows_that_do_not_split_into_256_fall_back():
    from mtpx.loading.convert import tensor_type
    assert tensor_type("blk.0.ffn_down.weight", (64, 512), "q4_k") == Q.Q4_K
    assert tensor_type("output.weight", (64, 512), "q4_k") == Q.Q6_K
    assert tensor_type("output.weight", (64, 96), "q4_k") == Q.Q8_0
    assert tensor_type("blk.0.ssm_out.weight", (64, 48), "q4_k") == Q.F16
    assert tensor_type("blk.0.attn_norm.weight", (512,), "q4_k") == Q.F32
