"""The rowgemm CPU kernel: each row's result is the same bits whatever the row count, and it is a correct matmul."""
import platform

import pytest
import torch

from mtpx import kernels
from mtpx.models import linear as linear_module
from mtpx.models.linear import Int8Weight, TileWeight, linear, row_invariant

from int_dot import reference
from isa import amx_code_built, amx_skip_reason

# where kernels.kernels_required() (CI), tests/conftest.py fails the run instead of letting these skip
needs_kernel = pytest.mark.skipif(not kernels.rowgemm_available(), reason="rowgemm kernel could not be built here")
needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason=amx_skip_reason() or "AMX is available")


@needs_kernel
@pytest.mark.parametrize("n,k", [(64, 64), (37, 48), (1024, 3584), (4096, 1024), (8192, 256)])
def test_rowgemm_rows_do_not_depend_on_row_count(n, k):
    check_rows_alone_and_together(lambda w: (lambda x: kernels.rowgemm(x, w)), n, k, 8, range(2, 9))


def check_rows_alone_and_together(make_matmul, n: int, k: int, rows: int, counts) -> torch.Tensor:
    """Every row alone gives the bits it gets among the first m rows (m in counts), and the result is x @ w.T to
    fp32 accumulation and one bf16 rounding. make_matmul(w) -> matmul(x)."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    matmul = make_matmul(w)
    alone = torch.cat([matmul(x[i:i + 1]) for i in range(rows)])
    for m in counts:
        assert torch.equal(matmul(x[:m]), alone[:m])
    ref = x.double() @ w.double().t()
    assert ((alone.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3 * k ** 0.5).all()
    return alone


@needs_kernel
def test_rowgemm_thread_count_does_not_change_bits():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3000, 512, generator=g).bfloat16(), torch.randn(5, 512, generator=g).bfloat16()
    same_bits_on_one_and_two_threads(lambda: kernels.rowgemm(x, w))


def same_bits_on_one_and_two_threads(matmul) -> torch.Tensor:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matmul()
        torch.set_num_threads(2)
        assert torch.equal(matmul(), one)
    finally:
        torch.set_num_threads(threads)
    return one


@needs_kernel
def test_rowgemm_rejects_bad_shapes():
    w = torch.randn(16, 32).bfloat16()
    with pytest.raises(RuntimeError, match="1..8 rows"):
        kernels.rowgemm(torch.randn(9, 32).bfloat16(), w)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.rowgemm(torch.randn(2, 24).bfloat16(), torch.randn(16, 24).bfloat16())


@needs_amx
@pytest.mark.parametrize("n,k", [(64, 64), (37, 64), (776, 256), (1024, 3584), (8192, 256)])
def test_tile_rows_do_not_depend_on_row_count(n, k):
    """AMX tiles (TileWeight): every row alone gives the bits it gets among 2..40 rows (several x tiles, a partial
    last one), n need not be a multiple of 16; the result is a correct matmul."""
    alone = check_rows_alone_and_together(lambda w: (lambda x, t=TileWeight(w): t.matmul(x, True)), n, k, 40,
                                          (2, 5, 8, 16, 17, 33, 40))
    assert alone.shape == (40, n) and alone.dtype == torch.bfloat16


@needs_amx
def test_tiles_of_a_long_prefill_and_any_thread_count_give_the_same_bits():
    """A prefill runs over the weights in chunks of x rows (K = 4096: 128 rows a chunk); threads split the columns."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(3000, 4096, generator=g).bfloat16(), torch.randn(300, 4096, generator=g).bfloat16()
    tiles = TileWeight(w)
    one = same_bits_on_one_and_two_threads(lambda: tiles.matmul(x, False))
    for i in (0, 127, 128, 255, 256, 299):
        assert torch.equal(tiles.matmul(x[i:i + 1], True), one[i:i + 1])


def test_tile_weight_layout_round_trips():
    w = torch.randn(40, 96).bfloat16()
    tiles = TileWeight(w)
    assert tiles.tiles.shape == (3, 3, 16, 32) and tiles.shape == (40, 96)
    assert torch.equal(tiles.unpacked(), w)
    # one tile holds, for 16 columns, the pairs of 32 consecutive elements of K
    assert torch.equal(tiles.tiles[1, 2, 5, 2 * 3:2 * 3 + 2], w[16 + 3, 64 + 10:64 + 12])
    ids = torch.tensor([0, 5, 39, 17])
    part = tiles.rows(ids)
    assert isinstance(part, TileWeight) and torch.equal(part.unpacked(), w[ids])


@needs_kernel
@pytest.mark.skipif(not amx_code_built(), reason="no AMX: the kernels were built for a CPU without AMX_BF16, whose "
                    "rowgemm_tiles stub rejects every call before checking shapes")
def test_rowgemm_tiles_rejects_bad_shapes():
    """Checked before AMX's use, so also where MTPX_AMX=0 or the OS refuses tile state, but only in an AMX build."""
    tiles = TileWeight(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="K = 32"):
        kernels.rowgemm_tiles(torch.randn(2, 32).bfloat16(), tiles.tiles, 32)
    with pytest.raises(RuntimeError, match="n does not match"):
        kernels.rowgemm_tiles(torch.randn(2, 64).bfloat16(), tiles.tiles, 40)


def test_padded_onednn_path_is_row_invariant_too(monkeypatch):
    """Where the kernel cannot be built, step matmuls fall back to fixed blocks of STEP_ROWS rows on oneDNN."""
    monkeypatch.setattr(linear_module, "uses_rowgemm", lambda w: False)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1024, 3584, generator=g).bfloat16()
    x = torch.randn(11, 3584, generator=g).bfloat16()
    with row_invariant():
        alone = torch.cat([linear(x[i:i + 1], w) for i in range(11)])
        for m in (2, 5, 6, 11):
            assert torch.equal(linear(x[:m], w), alone[:m])


@needs_kernel
def test_rowgemm_int8_rows_do_not_depend_on_row_count_and_match_dequantized():
    g = torch.Generator().manual_seed(3)
    w = Int8Weight(torch.randn(1000, 512, generator=g).bfloat16())
    x = torch.randn(8, 512, generator=g).bfloat16()
    alone = torch.cat([kernels.rowgemm_int8(x[i:i + 1], w.q, w.scale) for i in range(8)])
    for m in range(2, 9):
        assert torch.equal(kernels.rowgemm_int8(x[:m], w.q, w.scale), alone[:m])
    assert torch.equal(alone, reference(x, w))  # x's Q8 codes, integer dot products (tests/int_dot.py)
    ref = x.double() @ (w.q.double() * w.scale.double()[:, None]).t()
    # x's codes (a step of max|x| / 127 per span of 256) cost 0.67 % of the norm here, 2 % of it at most per element
    assert (alone.double() - ref).norm() / ref.norm() < 0.01
    assert ((alone.double() - ref).abs() <= ref.abs() * 2 ** -7 + 0.04 * ref.pow(2).mean().sqrt()).all()
    # and the prefill path (PyTorch's int8 weight-only matmul) computes the same function up to rounding
    with row_invariant(False):
        prefill = linear(x, w)
    assert ((prefill.double() - ref).abs() <= ref.abs() * 2 ** -6 + 5e-2).all()


@needs_kernel
def test_fused_norm_and_swiglu_match_pytorch():
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(7, 96, generator=g) * 3).bfloat16()
    w = (torch.randn(96, generator=g) * 0.1).bfloat16()
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.float())).bfloat16()
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6, True), ref, rtol=2 ** -7, atol=1e-6)
    gate_up = (torch.randn(5, 2 * 48, generator=g) * 2).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=2 ** -7, atol=1e-6)


@needs_kernel
def test_attention_step_rejects_positions_past_the_cache():
    cache = torch.zeros(1, 4, 16, dtype=torch.bfloat16)
    qkv = torch.zeros(2, 2 * 16 + 2 * 16, dtype=torch.bfloat16)
    cos = torch.ones(2, 4, dtype=torch.bfloat16)
    w = torch.zeros(16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="exceed the cache"):
        kernels.attention_step(qkv, w, w, cos, cos, cache, cache.clone(), 3, 1, 1, 16, 1e-6)


@needs_kernel
@pytest.mark.parametrize("dv", [32, 24])  # 24: rows not 64-byte aligned, so no streaming stores
def test_gdn_replay_rebuilds_the_states_of_a_verify_pass_bit_for_bit(dv):
    """A verify pass keeps only its last state; rollback replays the accepted positions. The replayed state must be
    exactly what a pass over just those positions computes (what plain decoding would have)."""
    g = torch.Generator().manual_seed(dv)
    nk, nv, dk, K = 2, 4, 16, 4
    conv_dim = 2 * nk * dk + nv * dv
    proj = torch.randn(5, conv_dim + nv * dv + 2 * nv, generator=g).bfloat16()
    conv_state = torch.randn(conv_dim, K - 1, generator=g).bfloat16()
    weights = (torch.randn(conv_dim, K, generator=g).bfloat16(), torch.randn(nv, generator=g),
               torch.randn(nv, generator=g), torch.randn(dv, generator=g).bfloat16())
    state = torch.randn(nv, dk, dv, generator=g)
    out, _, last, replay = kernels.gdn_step(proj, conv_state, *weights, state, nk, dk, dv, 1e-6)
    for n in range(1, 6):
        out_n, _, last_n, _ = kernels.gdn_step(proj[:n], conv_state, *weights, state, nk, dk, dv, 1e-6)
        assert torch.equal(out_n, out[:n])  # each position's output ignores later positions
        assert torch.equal(kernels.gdn_replay(state, replay, n), last_n)
    assert torch.equal(last_n, last)
    with pytest.raises(RuntimeError, match="n must be in 1..5"):
        kernels.gdn_replay(state, replay, 6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torch_argmax(dtype):
    """First index of the largest value, NaN counted as the largest, ties and tails (V not a multiple of 16)."""
    g = torch.Generator().manual_seed(0)
    for V in (1, 7, 16, 33, 2048, 8193):
        x = torch.randn(5, V, generator=g).to(dtype)
        x[1] = 0.0  # all tied: index 0
        if V > 3:
            x[2, V // 2] = x[2, V - 1] = 1e4  # a tie between two maxima: the first
            x[3, V - 2] = float("nan")  # NaN wins, even after larger values
            x[3, 0] = float("nan") if V > 20 else x[3, 0]
            x[4] = -torch.inf
        assert kernels.argmax_rows(x) == x.argmax(-1).tolist(), V


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path):
    """A build killed mid-compile leaves PyTorch's lock file: later processes must not wait for it forever."""
    import os
    import threading
    import time
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    kernels.clear_stale_build_lock(tmp_path, stale_s=60)
    assert not lock.exists()
    lock.touch()  # a build in progress: waited for until its process removes the lock
    threading.Timer(0.3, lock.unlink).start()
    t0 = time.time()
    kernels.clear_stale_build_lock(tmp_path, stale_s=60, poll_s=0.05)
    assert not lock.exists() and time.time() - t0 >= 0.25


FLUSH_AFTER_THE_WORKERS_STARTED = """
import torch
torch.set_num_threads(2)
x = torch.full((1 << 22,), 1e-38)
x * 0.5  # an op big enough to start the intra-op worker threads
from mtpx.runners.cpu import tune_cpu_process
tune_cpu_process()
print(int(((x * 0.5) != 0).sum()))
"""


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the flags are x86's (MXCSR)")
def test_subnormals_are_flushed_on_worker_threads_started_before_the_setting():
    # 1e-38 / 2 is subnormal: every element must come out 0, also those the workers computed (the flag is per thread)
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", FLUSH_AFTER_THE_WORKERS_STARTED], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0"


BUILD = """
from mtpx import kernels
print("available", kernels.rowgemm_available())
"""


def _broken_build_env(tmp_path, **env) -> dict:
    """A build that fails in the compiler (an -march it does not know), in a build directory of its own."""
    import os
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "MTPX_REQUIRE_KERNELS", "MTPX_ROWGEMM")}
    return {**base, "MTPX_KERNEL_MARCH": "no-such-cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env}


def test_a_failed_build_raises_in_ci_and_falls_back_with_a_warning_elsewhere(tmp_path):
    import subprocess
    import sys

    def run(**env):
        return subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, timeout=300,
                              env=_broken_build_env(tmp_path, **env))
    for env in (dict(CI="true"), dict(MTPX_REQUIRE_KERNELS="1")):
        out = run(**env)
        assert out.returncode != 0, (env, out.stdout)
        assert "KernelBuildError" in out.stderr and "no-such-cpu" in out.stderr, out.stderr  # the compiler's message
    for env in (dict(), dict(CI="true", MTPX_REQUIRE_KERNELS="0")):
        out = run(**env)
        assert out.returncode == 0 and "available False" in out.stdout, (env, out.stderr)
        assert "could not build the CPU kernels" in out.stderr


def test_a_failed_build_fails_the_test_run_in_ci_instead_of_skipping(tmp_path):
    """tests/conftest.py: the kernel tests' skip conditions do not hide a broken build where kernels are required."""
    import subprocess
    import sys
    from pathlib import Path
    test = f"{Path(__file__).resolve()}::test_tile_weight_layout_round_trips"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], capture_output=True,
                         text=True, timeout=300, env=_broken_build_env(tmp_path, CI="true"),
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode != 0 and "failed to build" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "passed" not in out.stdout
