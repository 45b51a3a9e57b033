"""mtpx's GGUF files in llama.cpp's terms.

1. The names: every tensor name and metadata key mtpx writes for GLM-4.5 (`glm4moe`), DeepSeek-V3 (`deepseek2`) and
   Qwen3-Next (`qwen3next`) is one of those llama.cpp's own gguf-py (the `gguf` package, a dependency) lists for that
   architecture, and the architecture string is gguf-py's. Always runs.
2. llama.cpp itself (through llama-cpp-python) loads mtpx's GGUF export of the demo model and, greedy, produces the
   same first 32 tokens as mtpx for a handful of prompts; it also tokenizes the prompts the same way.

The second part runs only where `llama_cpp` can be imported: llama-cpp-python is not a dependency of mtpx or of its CI.
To use one built into another environment of the same Python version, set MTPX_LLAMA_CPP_SITE to that environment's
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


# ---------------------------------------------------------------- 1. names, against llama.cpp's gguf-py tables

# gguf-py's architecture of each family's export
GGUF_PY_ARCH = {"glm": "GLM4_MOE", "glm_lite": "DEEPSEEK2", "deepseek": "DEEPSEEK2", "qwen3_next": "QWEN3NEXT"}
# llama.cpp writes these for its hybrid (Gated DeltaNet) archs, after the gguf-py on PyPI (0.19) was cut; mtpx reads
# them and also writes full_attention_interval, which that gguf-py has
KEYS_NEWER_THAN_GGUF_PY = {"{arch}.attention.recurrent_layers"}


def _key_templates() -> set[str]:
    import gguf

    found = set()

    def walk(cls) -> None:
        for v in vars(cls).values():
            if isinstance(v, str):
                found.add(v)
            elif isinstance(v, type):
                walk(v)
    walk(gguf.Keys)
    return found


@pytest.mark.parametrize("family,kw", [("glm", {}), ("glm", {"tied": True}), ("deepseek", {"yarn": True}),
                                       ("deepseek", {"q_lora": False}), ("glm_lite", {}), ("qwen3_next", {})],
                         ids=["glm4moe", "glm4moe-tied", "deepseek2-yarn", "deepseek2-no-q-lora",
                              "deepseek2-glm-lite", "qwen3next"])
def test_written_names_and_keys_are_in_llama_cpps_tables(family_factory, tmp_path, family, kw):
    """Each tensor `blk.N.x.weight` / `.bias` must be a `blk.{bid}.x` gguf-py lists for the arch. The MTP layer's
    `nextn.*` names: where gguf-py's table for the arch lists no NEXTN tensor at all (deepseek2 and qwen3next in
    gguf-py 0.19, whose tables predate llama.cpp's MTP graphs for them), they must be the NEXTN names it defines
    (those its glm4moe table lists); once it lists them for the arch, they are checked against the arch's own."""
    import re

    from gguf import GGUFReader
    from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES
    out = tmp_path / "model.gguf"
    summary = write_gguf(load_checkpoint(family_factory(family, **kw)), out, "bf16")
    arch = getattr(MODEL_ARCH, GGUF_PY_ARCH[family])
    name = MODEL_ARCH_NAMES[arch]
    reader = GGUFReader(str(out))
    assert summary["arch"] == name and reader.fields["general.architecture"].contents() == name
    listed = {TENSOR_NAMES[t] for t in MODEL_TENSORS[arch]}
    nextn = {TENSOR_NAMES[t] for t in MODEL_TENSOR if t.name.startswith("NEXTN_")}
    allowed = listed | (nextn if not nextn & listed else set())
    written = {re.sub(r"\.(weight|bias)$", "", re.sub(r"^blk\.\d+\.", "blk.{bid}.", t.name)) for t in reader.tensors}
    assert written - allowed == set(), f"not llama.cpp's {name} tensor names"
    assert {n for n in written if ".nextn." in n} >= {f"blk.{{bid}}.nextn.{n}" for n in (
        "eh_proj", "enorm", "hnorm", "shared_head_norm")}  # the MTP layer is there, under llama.cpp's names
    templates = _key_templates()
    keys = {k.replace(f"{name}.", "{arch}.", 1) for k in reader.fields if not k.startswith("GGUF.")}
    assert keys - templates - KEYS_NEWER_THAN_GGUF_PY == set(), f"not llama.cpp's metadata keys for {name}"
    assert "{arch}.nextn_predict_layers" in keys and "{arch}.block_count" in keys


# ---------------------------------------------------------------- 2. llama.cpp itself

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
needs_llama_cpp = pytest.mark.skipif(
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


@needs_llama_cpp
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


@needs_llama_cpp
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
