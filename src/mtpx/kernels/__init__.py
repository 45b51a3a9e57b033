"""CPU kernels that PyTorch lacks, compiled when mtpx is installed (setup.py: the extension mtpx.kernels._C).

`rowgemm(x, w)`: x [M <= 8, K] @ w[N, K]^T with bf16 weights, fp32 accumulation. Each output row is computed the
same way whatever M is (so a verify pass is bit-identical to one-token steps), and the weights are read once for
all rows (so it costs about what one row costs; on a CPU without AVX512_BF16, oneDNN's bf16 matmul costs several
times more for 5 rows than for 1). `rowgemm_int8` / `rowgemm_int4` / `rowgemm_int8_blocks`: the same for
int8 weights (a scale per row), int4 weights in groups of 32 and int8 weights in groups of 16.
The small ops of a step forward, fused (step_core_isa.h, on tensors in step_ops_isa.h): `rms_norm`, `silu_mul`,
`attention_step` (q/k norm, RoPE, cache write, per-position attention, output gate) and `gdn_step` (conv, gates,
delta rule, gated norm; with `gdn_replay` to rebuild the state after any of its positions on rollback). A step of a
small model is otherwise a few hundred PyTorch ops of a few microseconds' overhead each. `attention_layer_step` /
`gdn_layer_step` (layer_step.cpp) chain those kernels through a whole decoder layer in one call, and `step_stack`
through a whole stack. `argmax_rows`: torch.argmax of each row, vectorised (greedy tokens and verify).
Set MTPX_ROWGEMM=0 to use PyTorch ops instead.

One build holds the kernels for every instruction set of its architecture (x86: scalar, AVX2+FMA, AVX-512 and AMX
tiles; aarch64: scalar, NEON); the best the CPU has runs, or the one MTPX_CPU_ISA names (read once, at load;
refused where the CPU lacks it), so one machine tests the lower levels too. Every level keeps each row's result
independent of the row count; the matmuls give the same bits on every level (gemm_core.h).

Where the installed package has no compiled kernels (installed without a compiler), or they were built from other
sources (an editable install edited since), they are compiled on first use instead, into PyTorch's extension cache
under a name made of the sources' hash, so environments with different sources never rebuild each other's; where
that fails too, mtpx warns once and runs on PyTorch ops. CI must not: with MTPX_REQUIRE_KERNELS=1 (or, when that is
unset, with CI set, as CI services do) a failed build raises with the compiler's output.
MTPX_KERNEL_MARCH (for tests): compile on first use, with that -march, ignoring an installed build.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from mtpx.errors import MtpxError
from mtpx.kernels import sources
from mtpx.kernels.sources import kernels_required

log = logging.getLogger(__name__)
MAX_ROWS = 8
ISAS = ("scalar", "avx2", "avx512", "amx", "neon")
_module = None
_tried = False
_build_error: str | None = None
_isa_error: str | None = None
_origin: str | None = None  # "installed" or "compiled on first use"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo, read once; empty where there is none)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX): without them oneDNN emulates its bf16
    matmul, and a many-row bf16 matmul is faster widened to fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _march() -> str | None:
    return os.environ.get("MTPX_KERNEL_MARCH") or None


def _extension_name() -> str:
    """The first-use build's name: the sources' hash, PyTorch's version and the -march where MTPX_KERNEL_MARCH sets
    one. Two environments with the same sources and PyTorch share the build; with others, each has its own."""
    import hashlib
    import platform
    key = f"{sources.source_hash()} {torch.__version__} {platform.machine()} {_march()}"
    return "mtpx_kernels_" + hashlib.sha1(key.encode()).hexdigest()[:12]


class KernelBuildError(RuntimeError):
    """The CPU kernels did not build where they are required (kernels_required())."""


class IsaError(MtpxError, RuntimeError):
    """MTPX_CPU_ISA names an instruction set this CPU (or build) lacks, or none mtpx knows (the CLI prints it as one
    line)."""


STALE_BUILD_S = 600  # a locked build directory in which nothing has changed for this long is an interrupted build


def clear_stale_build_lock(build_dir: Path, stale_s: float = STALE_BUILD_S, poll_s: float = 1.0) -> None:
    """PyTorch's extension build leaves its lock file behind when the building process is killed (say, Ctrl-C
    during the first compile), and every later process then waits for it forever, silently. Wait while another
    build shows progress (a file in the directory changed within stale_s); remove a lock that shows none."""
    import sys
    import time
    lock, told = build_dir / "lock", False
    while lock.exists():
        try:
            newest = max(p.stat().st_mtime for p in build_dir.iterdir())
        except (OSError, ValueError):  # a file went away between listing and stat: the build is moving
            time.sleep(poll_s)
            continue
        if time.time() - newest > stale_s:
            print(f"mtpx: removing the lock of an interrupted kernel build ({lock})", file=sys.stderr, flush=True)
            lock.unlink(missing_ok=True)
            return
        if not told:
            print("mtpx: waiting for another process to finish compiling the CPU kernels", file=sys.stderr,
                  flush=True)
            told = True
        time.sleep(poll_s)


def rowgemm_module():
    """The compiled extension, or None where it cannot be built (no compiler) or MTPX_ROWGEMM=0. Where
    kernels_required(), a failed build raises KernelBuildError (on this call and every later one) instead; an
    MTPX_CPU_ISA the CPU lacks raises IsaError."""
    global _module, _tried, _build_error
    if not _tried:
        _tried = True
        if os.environ.get("MTPX_ROWGEMM", "1") != "0":
            try:
                _module = _load()
            except Exception as e:  # noqa: BLE001 - any build failure means: use the portable path (or fail, in CI)
                _build_error = f"{type(e).__name__}: {e}"
                if not kernels_required():
                    log.warning("mtpx: could not build the CPU kernels (%s); steps use PyTorch ops (oneDNN for "
                                "matmuls), several times slower. For the fast path install a C++ compiler (g++ or "
                                "clang with OpenMP) and reinstall mtpx (`make install`, or `pip install "
                                "--no-build-isolation -e .` in a clone)", e)
            if _module is not None:
                _choose_isa(_module)
    if _build_error is not None and kernels_required():
        raise KernelBuildError("mtpx: the CPU kernels failed to build, and they are required here "
                               "(MTPX_REQUIRE_KERNELS=1, or CI set; MTPX_REQUIRE_KERNELS=0 allows the PyTorch "
                               f"fallback):\n{_build_error}")
    if _isa_error is not None:
        raise IsaError(_isa_error)
    return _module


def _choose_isa(module) -> None:
    """MTPX_CPU_ISA, read once: the instruction set to run instead of the best this CPU has."""
    global _isa_error
    want = os.environ.get("MTPX_CPU_ISA", "").strip().lower()
    if not want:
        return
    have = list(module.cpu_isas())
    if want not in ISAS:
        _isa_error = f"MTPX_CPU_ISA={want} is none of {', '.join(ISAS)}; this CPU runs {', '.join(have)}"
    elif want not in have:
        _isa_error = f"MTPX_CPU_ISA={want}, but this CPU runs only {', '.join(have)}"
    else:
        module.set_isa(want)


def build_error() -> str | None:
    """Why the kernels did not build (the compiler's output), or None where they built or were not tried."""
    return _build_error


def _installed():
    """The extension built at install, or None where there is none or it was built from other sources."""
    if _march() is not None:
        return None
    try:
        from mtpx.kernels import _C
    except ImportError:
        return None
    try:
        current = sources.source_hash()
    except OSError:  # the sources are not installed beside it: nothing to compare with
        return _C
    if _C.source_hash != current:
        log.info("mtpx: the installed CPU kernels were built from other sources (%s, now %s); compiling these",
                 _C.source_hash, current)
        return None
    return _C


def _load():
    global _origin
    module = _installed()
    if module is not None:
        _origin = "installed"
        return module
    _origin = "compiled on first use"
    return _build()


def _build():
    import sys

    from torch.utils.cpp_extension import _get_build_directory, load
    try:  # the ninja that pip installed with mtpx, also when the virtual environment is not activated
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    name = _extension_name()
    build_dir = Path(_get_build_directory(name, False))
    clear_stale_build_lock(build_dir)
    if not (build_dir / f"{name}.so").exists():
        print("mtpx: compiling the CPU kernels (once per version of them, ~1-2 min): the installed package has none "
              "built from these sources", file=sys.stderr, flush=True)
    cflags = list(sources.CFLAGS) + [f"-DMTPX_SOURCE_HASH={sources.source_hash()}"]
    if _march() is not None:
        cflags.append(f"-march={_march()}")
    return load(name=name, sources=[str(sources.HERE / f) for f in sources.SOURCES], verbose=False,
                extra_cflags=cflags, extra_ldflags=list(sources.LDFLAGS))


def isa() -> str:
    """The instruction set the kernels run on (scalar, avx2, avx512, amx, neon), or "pytorch" where they are not
    built (PyTorch ops)."""
    return rowgemm_module().isa() if rowgemm_available() else "pytorch"


def cpu_isas() -> list[str]:
    """The instruction sets this CPU and build can run the kernels on, best first (empty without kernels)."""
    return list(rowgemm_module().cpu_isas()) if rowgemm_available() else []


def set_isa(name: str) -> None:
    """Run the kernels on another instruction set this CPU has (tests; MTPX_CPU_ISA at load otherwise). Set it
    before loading a model: which weights are packed as AMX tiles is decided at load."""
    if name not in cpu_isas():
        raise IsaError(f"instruction set {name} is not available; this CPU runs {', '.join(cpu_isas())}")
    rowgemm_module().set_isa(name)


def kernel_origin() -> str | None:
    """Where the kernels came from: "installed" (built with the package), "compiled on first use", or None."""
    return _origin if rowgemm_available() else None


def rowgemm_available() -> bool:
    return rowgemm_module() is not None


def rowgemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rowgemm_module().rowgemm(x, w)


def rowgemm_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return rowgemm_module().rowgemm_int8(x, q, scale)


def flush_denormals() -> None:
    """Flush subnormal floats to zero on this thread (torch.set_flush_denormal) and, where the kernels are built, on
    every intra-op worker: the flag is per thread, and workers started before it was set would keep subnormals."""
    torch.set_flush_denormal(True)
    if rowgemm_available():
        rowgemm_module().flush_denormals()


def amx_available() -> bool:
    """Whether bf16 weights can run as AMX tiles here (rowgemm_tiles): the CPU has AMX_BF16, the kernels were built
    for it, the OS grants the process tile state, and MTPX_AMX is not 0."""
    return rowgemm_available() and rowgemm_module().amx_available()


def int_dot_vnni() -> bool:
    """Whether the integer matmuls (int8, int4, GGUF blocks) run on VNNI dot products now: the instruction set in use
    has them on this CPU (AVX-VNNI for avx2, AVX512_VNNI for avx512 and amx; for neon the dot-product extension,
    SDOT), the kernels were built with them (GCC 11+, or a compiler whose aarch64 baseline has SDOT), and MTPX_VNNI
    is not 0 (a baseline's SDOT stays on). The results are the same bits either way."""
    return rowgemm_available() and rowgemm_module().int_dot_vnni()


def set_int_dot_vnni(on: bool) -> None:
    """Run the integer matmuls on VNNI where int_dot_vnni() would allow it (True), or without (False): tests."""
    rowgemm_module().set_int_dot_vnni(on)


def rowgemm_tiles(x: torch.Tensor, tiles: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] (any M) @ w.T on AMX, the bf16 weight w [n, K] packed as tiles [ceil(n / 16), K / 32, 16, 32]
    (models/linear.py TileWeight). Row-invariant like rowgemm; bf16 result."""
    return rowgemm_module().rowgemm_tiles(x, tiles, n)


def rowgemm_int4(x: torch.Tensor, codes: torch.Tensor, groups: torch.Tensor, supers: torch.Tensor) -> torch.Tensor:
    """x [M <= 8, K] @ w.T for int4 weights: codes [N, K / 2] (two a byte, even element low), each group of 32 along
    K with an int8 pair (sc, m) in groups [N, K / 32, 2] and its super-block's fp16 pair (d, dmin) in supers
    [N, S, 2] (S dividing K / 32 by a power of two): w = code * (d * sc) + dmin * m. Row-invariant like rowgemm."""
    return rowgemm_module().rowgemm_int4(x, codes, groups, supers)


def rowgemm_int8_blocks(x: torch.Tensor, codes: torch.Tensor, groups: torch.Tensor,
                        supers: torch.Tensor) -> torch.Tensor:
    """x [M <= 8, K] @ w.T for int8 codes [N, K] in groups of 16 along K, scaled as rowgemm_int4's groups (groups
    [N, K / 16, 2], supers [N, S, 2]). Row-invariant like rowgemm."""
    return rowgemm_module().rowgemm_int8_blocks(x, codes, groups, supers)


def fused_step_ops(x: torch.Tensor) -> bool:
    """Whether a step forward on x can use the fused small-op kernels (bf16 on CPU, kernels built)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and rowgemm_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:
    """RMSNorm over the last dim of bf16 x; weight used as (1 + weight) when `offset` (Qwen3.5's zero-centred form)."""
    return rowgemm_module().rms_norm(x.contiguous(), weight, eps, offset)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate | up) -> silu(gate) * up [..., I]."""
    return rowgemm_module().silu_mul(gate_up.contiguous())


def attention_step(qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, n_heads: int,
                   n_kv: int, head_dim: int, eps: float) -> torch.Tensor:
    """Gated attention of T positions of one sequence over its KV cache (writes their k, v at start..start+T)."""
    return rowgemm_module().attention_step(qkv.contiguous(), q_norm, k_norm, cos.contiguous(), sin.contiguous(),
                                           cache_k, cache_v, start, n_heads, n_kv, head_dim, eps)


def gdn_step(proj: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor,
             dt_bias: torch.Tensor, norm_weight: torch.Tensor, state: torch.Tensor, nk: int, dk: int, dv: int,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated DeltaNet layer core over T positions of one sequence, from the fused projection output proj
    [T, conv_dim + nv * dv + 2 * nv]: out [T, nv * dv], the conv inputs [conv_dim, K - 1 + T], the state after the
    last position, and `replay`, from which `gdn_replay(state, replay, n)` rebuilds the state after position n."""
    return tuple(rowgemm_module().gdn_step(proj.contiguous(), conv_state, conv_weight.contiguous(), A_log, dt_bias,
                                           norm_weight, state.contiguous(), nk, dk, dv, eps))


def attention_layer_step(x: torch.Tensor, weights: tuple, cos: torch.Tensor, sin: torch.Tensor,
                         cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, n_heads: int, n_kv: int,
                         head_dim: int, eps: float) -> torch.Tensor:
    """A full-attention decoder layer over T positions x [T, hidden] of one sequence: the same kernels, in the same
    order, as the module path (so the same bits). `weights`: DecoderLayer.step_weights()."""
    return rowgemm_module().attention_layer_step(x.contiguous(), *weights, cos.contiguous(), sin.contiguous(), cache_k,
                                                 cache_v, start, n_heads, n_kv, head_dim, eps)


def gdn_layer_step(x: torch.Tensor, weights: tuple, conv_state: torch.Tensor, state: torch.Tensor, nk: int, dk: int,
                   dv: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Gated DeltaNet decoder layer over T positions x [T, hidden] of one sequence: the layer's output, then what
    gdn_step returns after it (conv inputs, state after the last position, replay)."""
    return tuple(rowgemm_module().gdn_layer_step(x.contiguous(), *weights, conv_state, state.contiguous(), nk, dk, dv,
                                                 eps))


def step_stack(embed: torch.Tensor, final_norm: torch.Tensor, eps: float, layers: list[tuple[str, tuple, tuple]]):
    """A decoder stack as one kernel object (layer_step.cpp's StackStep) whose run() takes a step pass of one
    sequence through every layer: layers as (layer type, DecoderLayer.step_weights(), DecoderLayer.mixer_dims())."""
    stack = rowgemm_module().StackStep(embed, final_norm, eps)
    for kind, weights, dims in layers:
        (stack.add_attention if kind == "full_attention" else stack.add_gdn)(*weights, *dims)
    return stack


def mtp_greedy_drafts(hidden: torch.Tensor, tokens: torch.Tensor, embed: torch.Tensor, norm_embedding: torch.Tensor,
                      norm_hidden: torch.Tensor, fc: list[torch.Tensor], layer_weights: tuple,
                      final_norm: torch.Tensor, head: list[torch.Tensor], head_ids: torch.Tensor | None,
                      cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                      k: int, n_heads: int, n_kv: int, head_dim: int, eps: float,
                      penalty: tuple | None = None) -> list[int]:
    """k greedy drafts of a one-layer MTP module in one call (layer_step.cpp), from the pending pairs (hidden [n, H],
    tokens [n]); writes the MTP KV cache at start .. start + n + k - 2. `penalty`: (counts [V], seen [V], repetition,
    frequency, presence), sampling.penalty_history's tensors and the SamplingParams values: drafts by the argmax
    of penalised logits, each draft counting for the next."""
    ids = head_ids if head_ids is not None else torch.empty(0, dtype=torch.long)
    counts, seen, repetition, frequency, presence = penalty or (torch.empty(0), torch.empty(0, dtype=torch.bool),
                                                                1.0, 0.0, 0.0)
    return rowgemm_module().mtp_greedy_drafts(
        hidden.contiguous(), tokens, embed, norm_embedding, norm_hidden, fc, *layer_weights, final_norm, head, ids,
        cos.contiguous(), sin.contiguous(), cache_k, cache_v, start, k, n_heads, n_kv, head_dim, eps,
        counts, seen, repetition, frequency, presence).tolist()


def argmax_rows(x: torch.Tensor) -> list[int]:
    """The index of the first largest value of each row of x [R, V] (any float type, any device), as
    x.argmax(-1).tolist() gives it (a NaN counts as the largest); vectorised on the CPU (step_ops_isa.h)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and rowgemm_available():
        return rowgemm_module().argmax_rows(x.reshape(-1, x.shape[-1]))
    return x.reshape(-1, x.shape[-1]).argmax(-1).tolist()


def penalize_rows(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, drafts: torch.Tensor,
                  repetition: float, frequency: float, presence: float) -> torch.Tensor | None:
    """sampling.apply_penalties' result (fp32 [R, V]) in one pass over the CPU logits [R, V], row j penalised for
    the history (counts, seen: sampling.penalty_history's tensors) plus drafts[:j]; None where it cannot run
    (not on the CPU, no kernels), for the PyTorch path."""
    if logits.device.type != "cpu" or not rowgemm_available():
        return None
    return rowgemm_module().penalize_rows(logits, counts, seen, drafts, repetition, frequency, presence)


def gdn_replay(state: torch.Tensor, replay: torch.Tensor, n: int) -> torch.Tensor:
    """The state after the first n positions of the gdn_step call that started from `state` and returned `replay`:
    bit-identical to what that call computed (the same instructions), at the cost of one pass over the state."""
    return rowgemm_module().gdn_replay(state, replay, n)
