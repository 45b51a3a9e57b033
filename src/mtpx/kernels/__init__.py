"""CPU kernels that PyTorch lacks, built on first use with the machine's C++ compiler (torch.utils.cpp_extension).

`rowgemm(x, w)`: x [M <= 8, K] @ w[N, K]^T with bf16 weights, fp32 accumulation. Each output row is computed the
same way whatever M is (so a verify pass is bit-identical to one-token steps), and the weights are read once for
all rows (so it costs about what one row costs; on a CPU without AVX512_BF16, oneDNN's bf16 matmul costs several
times more for 5 rows than for 1). `rowgemm_int8` / `rowgemm_int4`: the same for
int8 weights and for int4 weights in groups of 32.
The small ops of a step forward, fused (step_ops.cpp): `rms_norm`, `silu_mul`, `attention_step` (q/k norm, RoPE,
cache write, per-position attention, output gate) and `gdn_step` (conv, gates, delta rule, gated norm; with
`gdn_replay` to rebuild the state after any of its positions on rollback). A step of a small model is otherwise a
few hundred PyTorch ops of a few microseconds' overhead each. `attention_layer_step` / `gdn_layer_step`
(layer_step.cpp) chain those kernels through a whole decoder layer in one call, and `step_stack` through a whole
stack. `argmax_rows`: torch.argmax of each row, vectorised (greedy tokens and verify).
Set MTPX_ROWGEMM=0 to use PyTorch ops instead.

Where the kernels cannot be built, mtpx warns and runs on PyTorch ops. CI must not: with MTPX_REQUIRE_KERNELS=1 (or,
when that is unset, with CI set, as CI services do) a failed build raises with the compiler's output.
MTPX_KERNEL_MARCH (for tests): build for that -march instead of the machine's own (e.g. haswell, an AVX2-only CPU),
under its own build name.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
MAX_ROWS = 8
_module = None
_tried = False
_build_error: str | None = None


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


def _march() -> str:
    return os.environ.get("MTPX_KERNEL_MARCH") or "native"


def _extension_name() -> str:
    """Built with -march=native: name the build after the CPU, so a cache shared by different machines never loads
    code for instructions this one lacks (and after the -march, where MTPX_KERNEL_MARCH sets another)."""
    import hashlib
    import platform
    cpu = platform.machine() + " ".join(sorted(cpu_flags()))
    if _march() != "native":
        cpu += " march=" + _march()
    return "mtpx_rowgemm_" + hashlib.sha1(cpu.encode()).hexdigest()[:10]


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def kernels_required() -> bool:
    """Whether a failed kernel build is an error rather than a fallback: MTPX_REQUIRE_KERNELS=1 (0: never), or, where
    that is unset, the CI variable that CI services set."""
    explicit = os.environ.get("MTPX_REQUIRE_KERNELS")
    return _truthy(explicit) if explicit is not None else _truthy(os.environ.get("CI", ""))


class KernelBuildError(RuntimeError):
    """The CPU kernels did not build where they are required (kernels_required())."""


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
    kernels_required(), a failed build raises KernelBuildError (on this call and every later one) instead."""
    global _module, _tried, _build_error
    if not _tried:
        _tried = True
        if os.environ.get("MTPX_ROWGEMM", "1") != "0":
            try:
                _module = _build()
            except Exception as e:  # noqa: BLE001 - any build failure means: use the portable path (or fail, in CI)
                _build_error = f"{type(e).__name__}: {e}"
                if not kernels_required():
                    log.warning("mtpx: could not build the CPU kernels (%s); steps use PyTorch ops (oneDNN for "
                                "matmuls)", e)
    if _build_error is not None and kernels_required():
        raise KernelBuildError("mtpx: the CPU kernels failed to build, and they are required here "
                               "(MTPX_REQUIRE_KERNELS=1, or CI set; MTPX_REQUIRE_KERNELS=0 allows the PyTorch "
                               f"fallback):\n{_build_error}")
    return _module


def build_error() -> str | None:
    """Why the kernels did not build (the compiler's output), or None where they built or were not tried."""
    return _build_error


def _build():
    import sys

    from torch.utils.cpp_extension import _get_build_directory, load
    try:  # the ninja that pip installed with mtpx, also when the virtual environment is not activated
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    sources = [str(Path(__file__).with_name(f))
               for f in ("rowgemm.cpp", "step_ops.cpp", "layer_step.cpp", "bindings.cpp")]
    name = _extension_name()
    build_dir = Path(_get_build_directory(name, False))
    clear_stale_build_lock(build_dir)
    if not (build_dir / f"{name}.so").exists():
        print("mtpx: compiling the CPU kernels (once, ~30 s)", file=sys.stderr, flush=True)
    return load(name=name, sources=sources, verbose=False,
                extra_cflags=["-O3", f"-march={_march()}", "-fopenmp"], extra_ldflags=["-fopenmp"])


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


def rowgemm_tiles(x: torch.Tensor, tiles: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] (any M) @ w.T on AMX, the bf16 weight w [n, K] packed as tiles [ceil(n / 16), K / 32, 16, 32]
    (models/linear.py TileWeight). Row-invariant like rowgemm; bf16 result."""
    return rowgemm_module().rowgemm_tiles(x, tiles, n)


def rowgemm_int4(x: torch.Tensor, codes: torch.Tensor, scale_offset: torch.Tensor) -> torch.Tensor:
    """x [M <= 8, K] @ w.T for int4 weights: codes [N, K / 2] (two a byte, even element low), fp32 scale and offset
    [N, K / 32, 2] (w = code * scale + offset). Row-invariant like rowgemm."""
    return rowgemm_module().rowgemm_int4(x, codes, scale_offset)


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
    x.argmax(-1).tolist() gives it (a NaN counts as the largest); vectorised on the CPU (step_ops.cpp)."""
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
