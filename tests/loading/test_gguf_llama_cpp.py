"""llama.cpp itself (through llama-cpp-python) loads mtpx's GGUF export of the demo model and, greedy, produces the
same first 32 tokens as mtpx for a handful of prompts; it also tokenizes the prompts the same way.

Runs only where `llama_cpp` can be imported: llama-cpp-python is not a dependency of mtpx or of its CI. To use one
built into another environment of the same Python version, set MTPX_LLAMA_CPP_SITE to that environment's
site-packages (appended to sys.path, so this environment's own packages keep precedence), e.g.
    MTPX_LLAMA_CPP_SITE=/work/peers-venv/lib/python3.11/site-packages pytest tests/loading/test_gguf_llama_cpp.py

The model is the checkpoint directory $MTPX_LLAMA_CPP_MODEL if set, else `models/demo` when it exists, else a
generated tiny checkpoint (random weights, with linear-attention key and value head sizes equal, which llama.cpp's
qwen35 graph requires). Real checkpoints are exported in bf16 (the default); the random one in f32, because its
near-flat logits (top-2 gaps ~1e-3) would otherwise let llama.cpp's bf16 rounding of activations flip a greedy
choice. mtpx runs in fp32 on the same file.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mtpx.llm import LLM
from mtpx.loading import load_checkpoint
from mtpx.loading.convert import write_gguf


def _import_llama_cpp():
    try:
        import llama_cpp
        return llama_cpp
    except ImportError:
        site = os.environ.get("MTPX_LLAMA_CPP_SITE")
        if not site:
            return None
        sys.path.append(site)
        try:
            import llama_cpp
            return llama_cpp
        except ImportError:
            return None


llama_cpp = _import_llama_cpp()
pytestmark = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python is not importable (pip install llama-cpp-python==0.3.36, or set "
                              "MTPX_LLAMA_CPP_SITE to the site-packages of an environment that has it)")

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
PROMPTS = ["def add(a, b):", "The quick brown fox", "Hello, how are you today?", "import os\nimport sys\n",
           "for i in range(10):\n    print("]
N_TOKENS = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("llama_cpp")
    if os.environ.get("MTPX_LLAMA_CPP_MODEL"):  # any checkpoint directory, exported in bf16
        src, outtype = Path(os.environ["MTPX_LLAMA_CPP_MODEL"]), "bf16"
    elif (DEMO / "config.json").exists():
        src, outtype = DEMO, "bf16"
    else:
        import checkpoints
        base = checkpoints.base_config

        def equal_heads(*args, **kwargs):
            cfg = base(*args, **kwargs)
            cfg["linear_value_head_dim"] = cfg["linear_key_head_dim"]
            return cfg
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(checkpoints, "base_config", equal_heads)
            src = checkpoints.make_checkpoint(out_dir / "generated")
        outtype = "f32"
    path = out_dir / f"model-{outtype}.gguf"
    summary = write_gguf(load_checkpoint(src), path, outtype)
    assert not summary["notes"], summary["notes"]
    return path, summary


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def test_llama_cpp_greedy_matches_mtpx(exported):
    path, summary = exported
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    assert llm.metadata.get(f"{summary['arch']}.nextn_predict_layers") == str(summary["n_mtp"])
    mtpx = LLM(path, dtype="fp32", device="cpu")
    prompts = list(PROMPTS)
    if mtpx.tokenizer.chat_template:
        prompts.append(mtpx.tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku."}]))
    mismatches = []
    for prompt in prompts:
        ids = mtpx.tokenizer.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
        ours = mtpx.generate(ids, max_tokens=N_TOKENS, temperature=0, ignore_eos=True, spec_type="none").token_ids
        theirs = llama_greedy(llm, ids, N_TOKENS)
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            mismatches.append(f"{prompt!r}: first difference at token {first}: mtpx {ours} llama.cpp {theirs}")
    assert not mismatches, "\n".join(mismatches)


def _k_quant_checkpoint(out_dir: Path, moe: bool) -> Path:
    """K-quants need rows of 256: a tiny model with hidden 256 and every matmul input a multiple of 256."""
    import checkpoints
    base = checkpoints.base_config

    def wide(*args, **kwargs):
        cfg = base(*args, **kwargs)
        cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=8, head_dim=32,
                   linear_key_head_dim=64, linear_value_head_dim=64)
        if cfg.get("num_experts"):
            cfg.update(moe_intermediate_size=256, shared_expert_intermediate_size=256)
        return cfg
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints, "base_config", wide)
        return checkpoints.make_checkpoint(out_dir / ("moe" if moe else "dense"), moe=moe)


@pytest.mark.parametrize("moe,ftypes,tol", [
    (False, ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_0", "Q8_0"], 0.06),
    (True, ["Q4_K_M"], 0.1)], ids=["dense", "moe"])
def test_llama_quantize_files_load_in_mtpx(tmp_path, moe, ftypes, tol):
    """Files quantized by llama.cpp (llama-quantize) load in mtpx and give llama.cpp's logits.

    llama.cpp quantizes activations to 8 bits inside quantized matmuls, so logits agree only to a few percent
    (relative RMS, measured 2.7-3.5 % dense, 2.7 % MoE); the weight quantization itself moves them 7-89 %, so a
    dequantization mistake would show far above the tolerance."""
    import ctypes

    import torch
    from gguf import GGUFReader

    from mtpx.loading import build_model
    src = _k_quant_checkpoint(tmp_path, moe)
    f32 = tmp_path / "model-f32.gguf"
    write_gguf(load_checkpoint(src), f32, "f32")
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    for ftype in ftypes:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 2
        q = tmp_path / f"model-{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(q).encode(), ctypes.byref(params)) == 0
        types = {t.tensor_type.name for t in GGUFReader(str(q)).tensors}
        assert ftype.split("_")[0] + "_" + ftype.split("_")[1] in types, (ftype, types)
        model = build_model(load_checkpoint(q), torch.float32)
        with torch.no_grad():
            ours = model.logits(model(ids))[0]
        llm = llama_cpp.Llama(model_path=str(q), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        llm.reset()
        llm.eval(ids[0].tolist())
        theirs = torch.from_numpy(np.array(llm.scores[: ids.shape[1]]))
        rel = ((ours - theirs).norm() / theirs.norm()).item()
        assert rel <= tol, f"{ftype}: mtpx vs llama.cpp logits differ by {rel:.3f} (relative RMS)"
