"""The CPU kernels on every instruction set this machine runs (scalar, AVX2, AVX-512, AMX; scalar and NEON on
aarch64), each skipped only where the CPU lacks it: the matmuls give the scalar loops' bits on every level (the
quantized ones also int_dot.py's, computed in PyTorch), each row's result is the same whatever the row count (1..8
rows: a verify pass of k + 1 positions), with the integer matmuls' VNNI builds and without where the CPU has VNNI,
and so are the fused step ops'; MTPX_CPU_ISA picks a level at load and refuses one the CPU lacks."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

from mtpx import kernels
from mtpx.models.grouped import Int4Weight, Int8BlockWeight
from mtpx.models.linear import Int8Weight

from int_dot import reference
from isa import LEVELS, isa_levels, running_on

needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="the CPU kernels could not be built here")


def _weights(n: int, k: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    out = {"bf16": w, "int8": Int8Weight(w), "int8 blocks": Int8BlockWeight(w)}
    if k % 32 == 0:
        out["int4"] = Int4Weight(w)
    return out


def _matmul(w):
    if isinstance(w, torch.Tensor):
        return lambda x: kernels.rowgemm(x, w)
    if isinstance(w, Int8Weight):
        return lambda x: kernels.rowgemm_int8(x, w.q, w.scale)
    f = kernels.rowgemm_int4 if isinstance(w, Int4Weight) else kernels.rowgemm_int8_blocks
    return lambda x: f(x, w.codes, w.groups, w.supers)


def _matmuls(n: int, k: int, seed: int) -> dict:
    return {name: _matmul(w) for name, w in _weights(n, k, seed).items()}


SHAPES = [(37, 64), (64, 48), (130, 512), (8, 1024)]  # 48: bf16 16 at a time, not in pairs of 16


@contextlib.contextmanager
def int_dot_vnni(on: bool):
    """The integer matmuls with VNNI or without, on the level in use; skips where VNNI is asked for and absent."""
    kernels.set_int_dot_vnni(on)
    try:
        if on and not kernels.int_dot_vnni():
            pytest.skip(f"no VNNI for {kernels.isa()} here (the CPU or the build lacks it, or MTPX_VNNI=0)")
        yield
    finally:
        kernels.set_int_dot_vnni(os.environ.get("MTPX_VNNI") != "0")


VNNI = [pytest.param(False, id="no-vnni"), pytest.param(True, id="vnni")]


@needs_kernel
@pytest.mark.parametrize("vnni", VNNI)
@pytest.mark.parametrize("level", isa_levels())
def test_matmuls_give_the_scalar_bits_and_ignore_the_row_count(level, vnni):
    for n, k in SHAPES:
        x = torch.randn(8, k, generator=torch.Generator().manual_seed(k)).bfloat16()
        with running_on("scalar"):
            reference = {name: f(x) for name, f in _matmuls(n, k, n).items()}
        with running_on(level), int_dot_vnni(vnni):
            for name, f in _matmuls(n, k, n).items():
                for m in range(1, 9):
                    for first in range(0, 9 - m, m):
                        got = f(x[first:first + m])
                        assert torch.equal(got, reference[name][first:first + m]), (level, name, n, k, m, first)


@needs_kernel
@pytest.mark.parametrize("vnni", VNNI)
@pytest.mark.parametrize("level", isa_levels())
def test_quantized_matmuls_are_the_q8_reference(level, vnni):
    """int4, int8 blocks and int8 rows (K a multiple of 32): x quantized to Q8, integer dot products, one float order;
    offsets and super-blocks of several sizes, more blocks than the kernels' scale chunk (9216), x with a zero block."""
    for n, k in SHAPES + [(24, 9216), (9, 96)]:
        if k % 32:
            continue
        g = torch.Generator().manual_seed(k + 1)
        spread = torch.rand(8, k // 32, 1, generator=g).expand(8, k // 32, 32).reshape(8, k) * 4  # per block
        x = (torch.randn(8, k, generator=g) * spread).bfloat16()
        x[3, 32:64] = 0
        with running_on(level), int_dot_vnni(vnni):
            for name, w in _weights(n, k, n).items():
                if name != "bf16":
                    assert torch.equal(_matmul(w)(x), reference(x, w)), (level, name, n, k)


def _attention_case(g, T: int):
    nh, nkv, D, rd = 4, 2, 64, 32
    qkv = torch.randn(T, 2 * nh * D + 2 * nkv * D, generator=g).bfloat16()
    norm = (torch.randn(D, generator=g) * 0.1).bfloat16()
    angles = torch.randn(T, rd, generator=g)
    return qkv, norm, angles.cos().bfloat16(), angles.sin().bfloat16(), nh, nkv, D


@needs_kernel
@pytest.mark.parametrize("level", isa_levels())
def test_step_ops_give_each_position_the_same_bits_alone_or_together(level):
    """rms_norm, silu_mul, attention_step and gdn_step over 5 positions in one call, against one call per
    position (as decode steps give them), on one instruction set."""
    g = torch.Generator().manual_seed(1)
    T = 5
    with running_on(level):
        x = (torch.randn(T, 200, generator=g) * 3).bfloat16()
        w = (torch.randn(200, generator=g) * 0.1).bfloat16()
        together = kernels.rms_norm(x, w, 1e-6, True)
        assert all(torch.equal(kernels.rms_norm(x[t:t + 1], w, 1e-6, True), together[t:t + 1]) for t in range(T))
        gate_up = (torch.randn(T, 2 * 600, generator=g) * 2).bfloat16()
        together = kernels.silu_mul(gate_up)
        assert all(torch.equal(kernels.silu_mul(gate_up[t:t + 1]), together[t:t + 1]) for t in range(T))

        qkv, norm, cos, sin, nh, nkv, D = _attention_case(g, T)
        past = 7
        cache = torch.randn(nkv, 32, D, generator=g).bfloat16()
        k1, v1, k2, v2 = cache.clone(), cache.clone(), cache.clone(), cache.clone()
        together = kernels.attention_step(qkv, norm, norm, cos, sin, k1, v1, past, nh, nkv, D, 1e-6)
        for t in range(T):
            alone = kernels.attention_step(qkv[t:t + 1], norm, norm, cos[t:t + 1], sin[t:t + 1], k2, v2, past + t,
                                           nh, nkv, D, 1e-6)
            assert torch.equal(alone, together[t:t + 1]), t
        assert torch.equal(k1, k2) and torch.equal(v1, v2)

        nk, nv, dk, dv, K = 2, 4, 32, 48, 4
        conv_dim = 2 * nk * dk + nv * dv
        proj = torch.randn(T, conv_dim + nv * dv + 2 * nv, generator=g).bfloat16()
        conv = torch.randn(conv_dim, K - 1, generator=g).bfloat16()
        weights = (torch.randn(conv_dim, K, generator=g).bfloat16(), torch.randn(nv, generator=g),
                   torch.randn(nv, generator=g), torch.randn(dv, generator=g).bfloat16())
        state = torch.randn(nv, dk, dv, generator=g)
        out, _, last, replay = kernels.gdn_step(proj, conv, *weights, state, nk, dk, dv, 1e-6)
        s = state
        for t in range(T):
            o, seq, s, _ = kernels.gdn_step(proj[t:t + 1], conv, *weights, s, nk, dk, dv, 1e-6)
            conv = seq[:, 1:]
            assert torch.equal(o, out[t:t + 1]), t
            assert torch.equal(kernels.gdn_replay(state, replay, t + 1), s), t
        assert torch.equal(s, last)

        logits = torch.randn(4, 1003, generator=g)
        logits[2, 500] = logits[2, 900] = 1e3
        assert kernels.argmax_rows(logits) == logits.argmax(-1).tolist()
        assert kernels.argmax_rows(logits.bfloat16()) == logits.bfloat16().argmax(-1).tolist()


LOAD = """
from mtpx import kernels
print("isa", kernels.isa(), kernels.amx_available(), kernels.int_dot_vnni())
"""


def _load_with(isa: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MTPX_ROWGEMM", "MTPX_KERNEL_MARCH", "MTPX_VNNI")}
    return subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300,
                          env={**env, "MTPX_CPU_ISA": isa, **env_vars})


@needs_kernel
def test_mtpx_cpu_isa_picks_the_level_and_refuses_one_the_cpu_lacks():
    have = kernels.cpu_isas()
    lowest = have[-1]
    out = _load_with(lowest)
    assert out.returncode == 0 and out.stdout.split() == ["isa", lowest, "False", "False"], out.stderr
    missing = next((level for level in LEVELS + ("neon", "avx2") if level not in have), None)
    for bad in [b for b in (missing, "sse9") if b]:
        out = _load_with(bad)
        assert out.returncode != 0
        line = out.stderr.strip().splitlines()[-1]
        assert f"MTPX_CPU_ISA={bad}" in line and ", ".join(have) in line, line


def test_an_installed_build_is_used_only_if_built_from_these_sources(monkeypatch):
    """kernels._installed(): the extension setup.py built (mtpx.kernels._C), unless its sources' hash differs from
    the sources beside it (an editable install edited since: then they are compiled on first use) or
    MTPX_KERNEL_MARCH asks for a build of its own."""
    import types

    from mtpx.kernels import sources
    fake = types.ModuleType("mtpx.kernels._C")
    monkeypatch.setitem(sys.modules, "mtpx.kernels._C", fake)
    monkeypatch.setattr(kernels, "_C", fake, raising=False)  # where the real one is imported already
    monkeypatch.delenv("MTPX_KERNEL_MARCH", raising=False)
    fake.source_hash = sources.source_hash()
    assert kernels._installed() is fake
    fake.source_hash = "0" * 16
    assert kernels._installed() is None
    fake.source_hash = sources.source_hash()
    monkeypatch.setenv("MTPX_KERNEL_MARCH", "haswell")
    assert kernels._installed() is None


@needs_kernel
def test_mtpx_vnni_0_turns_the_vnni_matmuls_off():
    best = kernels.cpu_isas()[0]
    with running_on(best), int_dot_vnni(True):  # skips where the CPU or build lacks VNNI
        pass
    with running_on(best), int_dot_vnni(False):
        if kernels.int_dot_vnni():
            pytest.skip("SDOT is in this compiler's aarch64 baseline: the NEON build has no loops without it")
    assert _load_with(best).stdout.split()[-1] == "True"
    assert _load_with(best, MTPX_VNNI="0").stdout.split()[-1] == "False"
