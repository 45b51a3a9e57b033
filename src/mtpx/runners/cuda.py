"""The CUDA runner: step passes of one sequence as static passes (runners/static.py) replayed as CUDA graphs.

A static pass runs every row-wise op on exactly WIDTH rows (the real positions plus padding) over caches at fixed
addresses: attention writes each row's k, v at its position and masks the whole cache; the Gated DeltaNet recurrence
runs the real positions only, as one Triton kernel on CUDA (kernels/gdn_triton.py) or token by token, writing the
state after each position to the snapshot buffers. A position's bits never depend on how many positions the pass
holds, by construction. Small fusible op groups are compiled with torch.compile (fixed shapes). Projections that read
the same input are one matmul. Off CUDA the same passes run eagerly, without graphs: that is how the CPU tests
check them (on CPU weights, runners/cpu.py's layouts, without its fused kernels). Prefill, MoE models (routing
picks experts on the host) and batched step passes run the family's reference code. Weight-only int8 / int4 stay
quantized in GPU memory and run on Triton kernels (kernels/triton_matmul.py), row-invariant like the rest.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtpx.errors import RequestError
from mtpx.kernels import gdn_triton
from mtpx.models import qwen3_5 as q35
from mtpx.models.linear import row_invariant
from mtpx.runners.base import Overrides, Runner, install
from mtpx.runners.config import RunnerConfig
from mtpx.runners.cpu import prepare_weights, tune_cpu_process
from mtpx.runners.static import WIDTH, StatePool, StaticState, is_static
from mtpx.runners.weights import QUANTIZATIONS, Quantizer, fuse_projections
from mtpx.state import SequenceState


@dataclass
class StaticPass(q35.Pass):
    """A static pass: the WIDTH rows' positions [WIDTH] (device), which cache entries each row sees
    [WIDTH, cache length], and how many rows are real."""
    positions: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    n_real: int = 0
    triton_gdn: bool = False


def run_static_stack(cfg, layers: nn.ModuleList, x: torch.Tensor, state: StaticState, n_real: int,
                     triton_gdn: bool) -> torch.Tensor:
    """run_stack for a static pass: x [1, WIDTH, H] of which n_real rows are real, positions read from the state's
    device tensor; StaticState.run_step does the host-side bookkeeping."""
    positions = state.position + torch.arange(WIDTH, device=x.device)
    cos, sin = (table[positions][None] for table in state.rotary)
    key_mask = torch.arange(state.cache_len, device=x.device)[None, :] <= positions[:, None]
    p = StaticPass([state], "step", cos, sin, positions, key_mask, n_real, triton_gdn)
    with row_invariant(False):  # every matmul has WIDTH rows: row-invariant by its fixed shape
        for layer in layers:
            x = layer(x, p)
    return x


def _attend(self: q35.Attention, fallback: Callable, q, k, v, p: q35.Pass) -> torch.Tensor:
    """Every row's k, v written at its position, every query over the whole cache under a mask (fixed shapes; keys
    past a row's position weigh exactly 0)."""
    if not isinstance(p, StaticPass):
        return fallback(q, k, v, p)
    K, V = p.states[0].kv[self.layer_idx]
    K.index_copy_(1, p.positions, k[0])
    V.index_copy_(1, p.positions, v[0])
    return F.scaled_dot_product_attention(q, K[None], V[None], attn_mask=p.key_mask, enable_gqa=True)


def _mix(self: q35.GatedDeltaNet, fallback: Callable, qkv, g, beta, p: q35.Pass) -> torch.Tensor:
    """All WIDTH rows through the conv and head split (fixed shapes), the real ones through the recurrence; the
    states after each position go to the snapshot buffers, the current ones are updated in place. Zero past the
    real rows."""
    if not isinstance(p, StaticPass):
        return fallback(qkv, g, beta, p)
    qkv, g, beta, state, T = qkv[0], g[0], beta[0], p.states[0], p.n_real
    i, K = self.layer_idx, self.kernel
    seq = torch.cat([state.conv[i], qkv.t()], dim=1)  # [conv_dim, K - 1 + WIDTH]
    q, k, v = self.heads(q35.causal_conv_step(seq, self.conv_weight, qkv.shape[0]))
    state.snap_conv[i][:T + 1].copy_(seq.unfold(1, K - 1, 1)[:, :T + 1].transpose(0, 1))  # window after t tokens
    if p.triton_gdn:
        out = gdn_triton.gated_delta_recurrence(q, k, v, g, beta, state.recurrent[i], state.snap_recurrent[i], T)
        state.conv[i].copy_(state.snap_conv[i][T])
        return out[None]
    rec = state.recurrent[i]
    state.snap_recurrent[i][0].copy_(rec)
    outs = []
    for t in range(T):
        o, rec = q35.recurrent_gated_delta_step(q[t], k[t], v[t], g[t], beta[t], rec)
        state.snap_recurrent[i][t + 1].copy_(rec)
        outs.append(o)
    state.conv[i].copy_(state.snap_conv[i][T])
    state.recurrent[i].copy_(rec)
    return torch.cat([torch.stack(outs), q.new_zeros(qkv.shape[0] - T, self.nv, self.dv)])[None]


class CudaRunner(Runner):
    """Static passes (with CUDA graphs on a GPU) where `static_steps`, else the reference code; fused projections."""
    name = "cuda"

    def __init__(self, device: torch.device, dtype: torch.dtype, config: RunnerConfig, static_steps: bool,
                 quantization: str | None = None):
        super().__init__(device, dtype, quantization)
        if quantization:
            try:
                import triton  # noqa: F401
            except ImportError:
                raise RequestError(f"dtype {quantization!r} on {device.type} needs Triton (PyTorch's CUDA builds "
                                   "ship it); install triton or use bf16") from None
        self.config, self.static_steps = config, static_steps
        on_cuda = device.type == "cuda"
        self.graphs = on_cuda and config.cuda_graphs
        self.triton_gdn = gdn_triton.available(device, config.triton_gdn)
        self.compiler = compile_fusible if on_cuda and config.compile_step_ops else None
        self.max_drafts = WIDTH - 1 if static_steps else None
        self.pools: dict[int, StatePool] = {}
        if not on_cuda:
            tune_cpu_process()

    def check_memory(self, cfg, mtp_layers: int, kept: dict[str, str] | None = None) -> None:
        if self.device.type != "cuda":
            return
        from mtpx.runners.plan import require_fit
        free, _ = torch.cuda.mem_get_info(self.device)
        dtype = self.quantization or {torch.float16: "fp16", torch.float32: "fp32"}.get(self.dtype, "bf16")
        require_fit(cfg, free, device="cuda", dtype=dtype, mtp_layers=mtp_layers, kept=kept)

    @property
    def load_device(self) -> torch.device:
        # quantized weights are made on the CPU, a tensor at a time, and only their codes go to the GPU
        return torch.device("cpu") if self.quantization else self.device

    def quantizer(self) -> Quantizer | None:
        if self.quantization not in QUANTIZATIONS:
            return None
        return Quantizer(self.quantization, gpu=self.device, fuse=self.config.pack)

    def prepare(self, model: nn.Module, quantizer: Quantizer | None = None) -> nn.Module:
        if self.quantization:  # Triton's int8 / int4 kernels (off CUDA: in its interpreter, for the tests)
            if self.config.pack:
                fuse_projections(model)
            (quantizer or Quantizer(self.quantization, gpu=self.device)).finish(model)
            model.to(self.device)
        elif self.device.type == "cuda":
            if self.config.pack:
                fuse_projections(model)
        else:
            prepare_weights(model, self.dtype, None, self.config.pack, self.config.tiles)
        if self.static_steps and isinstance(model, q35.Qwen35Model):
            install(model, {**OVERRIDES,
                            (q35.Qwen35Model, "forward"): functools.partial(_model_forward, self),
                            (q35.MTP, "forward"): functools.partial(_mtp_forward, self)})
        return model

    def new_static_state(self, model: q35.Qwen35Model, stack: str, max_len: int) -> StaticState:
        """Caches for static passes of the main stack ("main") or the MTP layers ("mtp")."""
        p = model.lm_head.weight
        cos, sin = q35.rotary_tables(model.cfg, [0], max_len + WIDTH, p.dtype, p.device)
        types = model.cfg.layer_types if stack == "main" else model.mtp.layer_types
        state = StaticState(model.cfg, types, max_len, p.dtype, p.device, (cos[0], sin[0]))
        state.use_graphs, state.compiler = self.graphs, self.compiler
        return state

    def state_pool(self, model: nn.Module) -> StatePool:
        """The pool of `model`'s static states, reused across requests with the graphs captured on them."""
        pool = self.pools.get(id(model))
        if pool is None:
            pool = self.pools[id(model)] = StatePool(functools.partial(self.new_static_state, model))
        return pool

    def new_state(self, model: nn.Module, max_len: int) -> SequenceState:
        if not self.static_steps:
            return model.new_state(max_len)
        return self.state_pool(model).acquire("main", max_len)

    def release_state(self, state: SequenceState) -> None:
        if isinstance(state, StaticState) and state.pool is not None and state.pool in self.pools.values():
            state.pool.release(state)
            state.pool = None  # released once, even if called again

    def describe(self) -> str:
        mode = ("static passes, CUDA graphs" if self.graphs else "static passes, eager") if self.static_steps \
            else "eager"
        return f"{self.device.type} ({mode})"


def _model_forward(runner: CudaRunner, self: q35.Qwen35Model, fallback: Callable, tokens: torch.Tensor,
                   states: list[SequenceState] | None = None, mode: str = "prefill") -> torch.Tensor:
    if mode != "step" or not is_static(states):
        return fallback(tokens, states, mode)

    def main(state: StaticState, tokens: torch.Tensor, n_real: int) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)
        return self.model.norm(run_static_stack(self.cfg, self.model.layers, x, state, n_real, runner.triton_gdn))
    # one pass (one graph) per sequence
    return torch.cat([s.run_step("main", functools.partial(main, s), tokens[b:b + 1]) for b, s in enumerate(states)])


def _mtp_forward(runner: CudaRunner, self: q35.MTP, fallback: Callable, cfg, embeds: torch.Tensor,
                 hidden: torch.Tensor, states: list[SequenceState] | None, mode: str) -> torch.Tensor:
    if mode != "step" or not is_static(states):
        return fallback(cfg, embeds, hidden, states, mode)

    def mtp(state: StaticState, embeds: torch.Tensor, hidden: torch.Tensor, n_real: int) -> torch.Tensor:
        with row_invariant(False):
            x = self.inputs(embeds, hidden)
        return self.norm(run_static_stack(cfg, self.layers, x, state, n_real, runner.triton_gdn))
    return torch.cat([s.run_step("mtp", functools.partial(mtp, s), embeds[b:b + 1], hidden[b:b + 1])
                      for b, s in enumerate(states)])


def _mtp_greedy_drafts(self: q35.Qwen35Model, fallback: Callable, hidden: torch.Tensor, tokens: torch.Tensor,
                       state: SequenceState, k: int, head=None, penalty: tuple | None = None) -> torch.Tensor | None:
    """The same passes as the drafter's step-by-step loop (catch-up, then one position per draft), each draft's
    argmax left on the device as the next pass's input: the passes (CUDA graphs) queue up behind one another, and
    the drafts stay there for the verify pass, so the host waits once a round, not once per draft nor between
    drafting and verifying. Penalised drafts are left to the drafter's loop."""
    if not isinstance(state, StaticState) or penalty is not None:
        return fallback(hidden, tokens, state, k, head, penalty)
    x = self.mtp_forward(hidden[None], tokens[None], [state], "step")[:, -1]
    drafts = []
    for j in range(k):
        token = head.argmax(x) if head is not None else self.logits(x, step=True).argmax(-1)
        drafts.append(token)
        if j + 1 < k:
            x = self.mtp_forward(x[:, None], token[:, None], [state], "step")[:, 0]
    return torch.cat(drafts)  # left on the device: the verify pass is queued behind these passes (speculative/draft.py)


def compile_fusible(fn: Callable) -> Callable:
    """A fusible op group compiled for static passes: fixed shapes, so each pass width replays the same kernels and
    rows keep their bits."""
    # one specialisation per shape: a model's norms alone come in several (hidden, heads, MTP), and a process may
    # hold several models; PyTorch's default limit of 8 per function fails hard at the ninth
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    return torch.compile(fn, dynamic=False, fullgraph=True)


OVERRIDES: Overrides = {
    (q35.Attention, "attend"): _attend,
    (q35.GatedDeltaNet, "mix"): _mix,
    (q35.Qwen35Model, "mtp_greedy_drafts"): _mtp_greedy_drafts,
}
