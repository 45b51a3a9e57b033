"""The CPU runner: the C++ kernels of mtpx.kernels for step passes (decode, verify, drafts) of bf16, int8 and int4
models.

At load it fuses projections that read the same input, quantizes (int8 / int4) or packs bf16 weights as AMX tiles
where the CPU has them. For step passes over caches it replaces the family's small-op groups with fused kernels
(norms, SwiGLU, the attention step, the Gated DeltaNet step), a decoder layer of one sequence with one call, the
whole main stack of one sequence with one call (kernels.StackStep) and k greedy MTP drafts with one call. Each
chains the same kernels in the same order as the finer-grained path, so every level gives the same bits
(tests/runners/test_cpu.py), and each row is computed as if alone, so greedy speculation stays exact. Prefill and
passes without caches run the family's reference code. A verify pass over a draft tree (models/common.py TreeRows)
runs on the per-module kernels, one call per chain of the tree, so its rows keep the bits of the chain path that
plain decoding takes; the MTP layer's tree drafting passes (masked, not exact) run the reference attention.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
from torch import nn

from mtpx import kernels
from mtpx.models import qwen3_5 as q35
from mtpx.models.linear import fused_projection, kernel_weight, project_joined, step_rows, step_weight
from mtpx.runners.base import Overrides, Runner, install
from mtpx.runners.config import RunnerConfig
from mtpx.runners.weights import (QUANTIZATIONS, STORED, Quantizer, fuse_projections, own_copies, pack_for_cpu,
                                  to_tiles)
from mtpx.state import SequenceState
from mtpx.threads import ThreadTuner


def retain_freed_memory() -> None:
    """Let glibc keep freed memory instead of handing it back to the OS. Every decode round allocates fresh
    per-token Gated DeltaNet states and frees the previous round's; returned memory costs a page fault per 4 KiB
    when it is touched again. Same idea as running PyTorch CPU inference on jemalloc / tcmalloc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # first hand back what loading freed (fp32 / unfused copies)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


def tune_cpu_process() -> None:
    """Process-wide settings for running (inference or training) on the CPU. Gated DeltaNet's decays underflow into
    subnormal floats, on which x86 arithmetic is many times slower; flushing them to zero changes only values below
    1.2e-38."""
    retain_freed_memory()
    kernels.flush_denormals()


# -- fused small-op groups (step passes only) -------------------------------------------------------------------

def _rms_norm(self: q35.RMSNorm, fallback: Callable, x: torch.Tensor) -> torch.Tensor:
    if step_rows():
        return kernels.rms_norm(x, self.weight, self.eps, True)
    return fallback(x)


def _mlp(self: q35.MLP, fallback: Callable, x: torch.Tensor) -> torch.Tensor:
    if step_rows():
        return self.down_proj(kernels.silu_mul(project_joined(self, self.FUSED_PROJECTIONS, x)))
    return fallback(x)


def _attention(self: q35.Attention, fallback: Callable, x: torch.Tensor, p: q35.Pass) -> torch.Tensor:
    if not p.step_over_caches or any(p.tree(b) is not None and not p.tree(b).in_place for b in range(x.shape[0])):
        return fallback(x, p)
    qkv = project_joined(self, self.FUSED_PROJECTIONS, x)
    step = lambda b, rows, start: kernels.attention_step(
        qkv[b, rows], self.q_norm.weight, self.k_norm.weight, p.cos[b, rows], p.sin[b, rows],
        *p.states[b].kv[self.layer_idx], start, self.n_heads, self.n_kv, self.head_dim, self.q_norm.eps)
    out = torch.stack([step(b, slice(None), p.states[b].length) if p.tree(b) is None
                       else _attention_tree(self, p.states[b], p.tree(b), lambda rows, start: step(b, rows, start))
                       for b in range(x.shape[0])])
    return self.o_proj(out)


def _attention_tree(self: q35.Attention, state: SequenceState, tree, step: Callable) -> torch.Tensor:
    """A tree laid out in place, one attention_step per chain of it (in order, so each finds its ancestors in the
    cache); each row's key and value are kept for the path that will be accepted."""
    K, V = state.kv[self.layer_idx]
    T = len(tree.parents)
    keys, values = K.new_empty(K.shape[0], T, K.shape[2]), V.new_empty(V.shape[0], T, V.shape[2])
    outs = []
    for a, e in tree.segments:
        w = tree.writes[a]
        outs.append(step(slice(a, e), w))
        keys[:, a:e], values[:, a:e] = K[:, w:w + e - a], V[:, w:w + e - a]
    state.row_kv[self.layer_idx] = (keys, values)
    return torch.cat(outs)


def keep_fused_states(gdn: q35.GatedDeltaNet, state: SequenceState, before: torch.Tensor, seq: torch.Tensor,
                      after: torch.Tensor, replay: torch.Tensor) -> None:
    """Record what a fused Gated DeltaNet step returned, for rollback. The states between positions are rebuilt
    only if a rollback asks for one (kernels.gdn_replay): writing each costs a verify pass more than the rare
    replay does."""
    lazy = [functools.partial(kernels.gdn_replay, before, replay, t + 1) for t in range(replay.shape[0] - 1)]
    gdn.record_states(state, seq, lazy + [after])


def _gdn(self: q35.GatedDeltaNet, fallback: Callable, x: torch.Tensor, p: q35.Pass) -> torch.Tensor:
    if not p.step_over_caches:
        return fallback(x, p)
    proj = project_joined(self, self.FUSED_PROJECTIONS, x)
    w, i, outs = self.conv_weight, self.layer_idx, []
    for b, state in enumerate(p.states):
        tree = p.tree(b)
        snaps = state.snapshots[i] if tree is not None else []
        base = len(snaps)  # snaps[base + t]: the states after row t, as the calls below record them
        current = state.conv[i], state.recurrent[i]
        parts = []
        for a, e in tree.segments if tree is not None else [(0, proj.shape[1])]:
            parent = tree.parents[a] if tree is not None else -1
            conv, before = current if parent < 0 else snaps[base + parent]
            if callable(before):  # a state between positions of an earlier chain: rebuilt now
                before = before()
                snaps[base + parent] = (conv, before)
            out, seq, after, replay = kernels.gdn_step(proj[b, a:e], conv, w, self.A_log, self.dt_bias,
                                                       self.norm.weight, before, self.nk, self.dk, self.dv,
                                                       self.norm.eps)
            keep_fused_states(self, state, before, seq, after, replay)
            parts.append(out)
        outs.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return self.out_proj(torch.stack(outs))


# -- whole layers, the whole stack, the MTP draft chain (one sequence) -------------------------------------------

def layer_weights(layer: q35.DecoderLayer) -> tuple | None:
    """The layer's weights as the whole-layer kernels take them (kernels/layer_step.cpp), or None where those
    cannot run it (MoE, projections not fused, a weight the kernel cannot read). Cached until the MLP's fused
    projection is replaced (by quantization or packing)."""
    fused = fused_projection(layer.mlp)
    cached = layer.__dict__.get("_cpu_weights")
    if cached is None or cached[0] is not fused:
        cached = layer.__dict__["_cpu_weights"] = (fused, _collect_layer_weights(layer) if fused else None)
    return cached[1]


def _collect_layer_weights(layer: q35.DecoderLayer) -> tuple | None:
    mlp = [layer.post_attention_layernorm.weight, step_weight(layer.mlp), step_weight(layer.mlp.down_proj)]
    m = layer.mixer
    if layer.layer_type == "linear_attention":
        mixer = [layer.input_layernorm.weight, step_weight(m), m.conv_weight.contiguous(), m.A_log, m.dt_bias,
                 m.norm.weight, step_weight(m.out_proj)]
    else:
        mixer = [layer.input_layernorm.weight, step_weight(m), m.q_norm.weight, m.k_norm.weight, step_weight(m.o_proj)]
    weights = tuple(mixer + mlp)
    return None if any(w is None for w in weights) else weights


def mixer_dims(layer: q35.DecoderLayer) -> tuple[int, int, int]:
    """The head sizes the whole-layer kernels take: (heads, kv heads, head dim) or (key heads, key dim, value dim)."""
    m = layer.mixer
    return (m.nk, m.dk, m.dv) if layer.layer_type == "linear_attention" else (m.n_heads, m.n_kv, m.head_dim)


def _decoder_layer(self: q35.DecoderLayer, fallback: Callable, x: torch.Tensor, p: q35.Pass) -> torch.Tensor:
    weights = layer_weights(self) if p.step_over_caches and x.shape[0] == 1 and not p.has_tree else None
    if weights is None:
        return fallback(x, p)
    state, m, eps = p.states[0], self.mixer, self.input_layernorm.eps
    if self.layer_type == "linear_attention":
        i = m.layer_idx
        before = state.recurrent[i]
        out, seq, after, replay = kernels.gdn_layer_step(x[0], weights, state.conv[i], before, m.nk, m.dk, m.dv, eps)
        keep_fused_states(m, state, before, seq, after, replay)
        return out[None]
    return kernels.attention_layer_step(x[0], weights, p.cos[0], p.sin[0], *state.kv[m.layer_idx], state.length,
                                        m.n_heads, m.n_kv, m.head_dim, eps)[None]


def step_stack(model: q35.Qwen35Model) -> tuple | None:
    """The main stack as one kernel object (kernels.StackStep), with the layers it needs states of; None where a
    layer has no whole-layer kernel. Rebuilt when a layer's weights change, like layer_weights."""
    layers = model.model.layers
    fused = [fused_projection(layer.mlp) for layer in layers]
    cached = model.__dict__.get("_cpu_stack")
    if cached is None or any(a is not b for a, b in zip(cached[0], fused)):
        weights = [layer_weights(layer) for layer in layers]
        stack = None
        if all(w is not None for w in weights):
            kernel = kernels.step_stack(model.model.embed_tokens.weight, model.model.norm.weight,
                                        model.cfg.rms_norm_eps,
                                        [(layer.layer_type, w, mixer_dims(layer)) for layer, w in zip(layers, weights)])
            attention = [layer.mixer.layer_idx for layer in layers if layer.layer_type == "full_attention"]
            gdn = [layer.mixer for layer in layers if layer.layer_type == "linear_attention"]
            stack = (kernel, attention, gdn)
        cached = model.__dict__["_cpu_stack"] = (fused, stack)
    return cached[1]


def _model_forward(self: q35.Qwen35Model, fallback: Callable, tokens: torch.Tensor, states: list[SequenceState] | None = None,
                   mode: str = "prefill") -> torch.Tensor:
    stack = (step_stack(self) if mode == "step" and states is not None and len(states) == 1
             and states[0].tree is None else None)
    if stack is None:
        return fallback(tokens, states, mode)
    kernel, attention, gdn = stack
    state, T = states[0], tokens.shape[1]
    state.check_room(T)
    cos, sin = q35.rotary_tables(self.cfg, [state.length], T, self.lm_head.weight.dtype, tokens.device)
    before = [state.recurrent[g.layer_idx] for g in gdn]
    out = kernel.run(tokens[0], cos[0], sin[0], state.length, [t for i in attention for t in state.kv[i]],
                     [state.conv[g.layer_idx] for g in gdn], before)
    for j, g in enumerate(gdn):
        keep_fused_states(g, state, before[j], *out[1 + 3 * j:4 + 3 * j])
    state.length += T
    return out[0][None]


def _mtp_greedy_drafts(self: q35.Qwen35Model, fallback: Callable, hidden: torch.Tensor, tokens: torch.Tensor, state: SequenceState,
                       k: int, head=None, penalty: tuple | None = None) -> list[int] | None:
    """k greedy drafts of a one-layer MTP module in one kernel call (kernels.mtp_greedy_drafts), from its n pending
    pairs (hidden [n, H], tokens [n]); advances the MTP state by n + k - 1. None where the kernel cannot run it."""
    mtp = self.mtp
    if len(mtp.layers) != 1 or hidden.dtype != torch.bfloat16:
        return fallback(hidden, tokens, state, k, head, penalty)
    layer = mtp.layers[0]
    weights, fc = layer_weights(layer), step_weight(mtp.fc)
    head_weight = kernel_weight(head.weight) if head is not None else step_weight(self.lm_head)
    if weights is None or fc is None or head_weight is None:
        return fallback(hidden, tokens, state, k, head, penalty)
    n = tokens.shape[0]
    state.check_room(n + k - 1)
    cos, sin = q35.rotary_tables(self.cfg, [state.length], n + k - 1, hidden.dtype, hidden.device)
    a = layer.mixer
    drafts = kernels.mtp_greedy_drafts(
        hidden, tokens, self.model.embed_tokens.weight, mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight,
        fc, weights, mtp.norm.weight, head_weight, head.ids if head is not None else None, cos[0], sin[0], *state.kv[a.layer_idx], state.length, k,
        a.n_heads, a.n_kv, a.head_dim, self.cfg.rms_norm_eps, penalty)
    state.length += n + k - 1
    return drafts


OVERRIDES: Overrides = {
    (q35.RMSNorm, "forward"): _rms_norm,
    (q35.MLP, "forward"): _mlp,
    (q35.Attention, "forward"): _attention,
    (q35.GatedDeltaNet, "forward"): _gdn,
    (q35.DecoderLayer, "forward"): _decoder_layer,
    (q35.Qwen35Model, "forward"): _model_forward,
    (q35.Qwen35Model, "mtp_greedy_drafts"): _mtp_greedy_drafts,
}
WHOLE_LAYER = [(q35.DecoderLayer, "forward")]
WHOLE_STACK = [(q35.Qwen35Model, "forward"), (q35.Qwen35Model, "mtp_greedy_drafts")]


def prepare_weights(model: nn.Module, dtype: torch.dtype, quantization: str | None, pack: bool,
                    tiles: bool = True, quantizer: Quantizer | None = None) -> None:
    """Weights in the layouts the CPU kernels read: projections fused (pack), int8 / int4 codes, or bf16 packed as
    AMX tiles where the CPU has them (tiles). `quantizer`: the one that quantized weights as they were read."""
    # int8 / int4: the loader's views are copied (own_copies) once quantized, so the bf16 weights it replaces never are
    converted = quantization in QUANTIZATIONS
    if pack and dtype == torch.bfloat16 and converted:
        fuse_projections(model)
    elif pack and dtype == torch.bfloat16:
        pack_for_cpu(model)
    if quantization:
        (quantizer or Quantizer(quantization)).finish(model)
    if pack and converted:
        own_copies(model)
    if quantization in (None, STORED) and dtype == torch.bfloat16 and tiles:
        to_tiles(model)  # (with STORED, the weights the file stores as floats)


class CpuRunner(Runner):
    """bf16 / int8 / int4 on the CPU; the fused step kernels where they are built (kernels.rowgemm_available)."""
    name = "cpu"

    def __init__(self, device: torch.device, dtype: torch.dtype, quantization: str | None, config: RunnerConfig,
                 fused: bool):
        super().__init__(device, dtype, quantization)
        self.config, self.fused, self.tiles = config, fused, config.tiles
        self.skipped: set = set()
        tune_cpu_process()
        if config.threads:
            torch.set_num_threads(config.threads)

    def skip_whole(self, layers: bool) -> None:
        """Leave out the kernels that run past a point where ranks exchange activations (runners/distributed.py):
        the whole stack and the MTP draft chain, and with `layers` whole decoder layers."""
        self.skipped = set(WHOLE_STACK) | (set(WHOLE_LAYER) if layers else set())

    def quantizer(self) -> Quantizer | None:
        if self.quantization not in QUANTIZATIONS:
            return None
        # fused where prepare_weights fuses
        return Quantizer(self.quantization, fuse=self.config.pack and self.dtype == torch.bfloat16)

    def prepare(self, model: nn.Module, quantizer: Quantizer | None = None) -> nn.Module:
        prepare_weights(model, self.dtype, self.quantization, self.config.pack, self.tiles, quantizer)
        if self.fused and isinstance(model, q35.Qwen35Model):
            install(model, {key: impl for key, impl in OVERRIDES.items() if key not in self.skipped})
        return model

    def thread_tuner(self) -> ThreadTuner | None:
        """Both cores are fastest while they are free, one while another process keeps one busy: measure, unless
        the thread count is fixed."""
        if self.config.threads or (cores := len(os.sched_getaffinity(0))) < 2:
            return None
        return ThreadTuner([1, cores])

    @property
    def step_row_block(self) -> int | None:
        from mtpx.models.linear import STEP_ROWS
        return kernels.MAX_ROWS if kernels.rowgemm_available() else STEP_ROWS

    def describe(self) -> str:
        vnni = " with VNNI" if self.quantization and kernels.int_dot_vnni() else ""
        parts = [f"fused kernels, {kernels.isa()}{vnni}" if self.fused else "oneDNN",
                 "quantized as stored" if self.quantization == STORED else
                 self.quantization or str(self.dtype).removeprefix("torch.")]
        if self.tiles and kernels.amx_available() and self.quantization in (None, STORED):
            parts.append("AMX tiles")
        return f"cpu ({', '.join(parts)})"
