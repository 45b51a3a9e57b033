"""One rank's part of a model run over several ranks (mtpx/parallel/), and where its collectives go.

Tensor parallel (Megatron-style, for the Qwen3.5 family): every rank holds a contiguous share of each layer's
attention heads (q / k / v rows, o_proj columns), Gated DeltaNet heads (the q, k, v rows of in_proj_qkv and their
conv channels, z / b / a rows, A_log, dt_bias, out_proj columns), MLP and expert intermediate rows / columns, and
of the output head's vocabulary; norms, the router, the shared-expert gate, the embedding and the MTP layer's fc
are whole on every rank. A layer's attention and its MLP / MoE each end in one sum over ranks of their partial
outputs (group.reduce_sum), the logits in one gather. The MTP layer is split the same way.

Layer split (llama.cpp's --split-mode layer): each rank holds a contiguous range of layers and the caches of only
those; the hidden state goes from one stage to the next; the last stage holds the MTP layer and sends the final
hidden state (and the MTP layer's output) to every rank, which applies its own copy of the output head.

Shards are cut while the model is still on the meta device (before any weight is read), and the checkpoint's
tensors are sliced as they are read (loading/checkpoint.build_model), so a rank never holds more than its share.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from mtpx.models import qwen3_5 as q35
from mtpx.parallel.config import ParallelConfig
from mtpx.parallel.group import Group
from mtpx.runners.base import Runner
from mtpx.state import SequenceState

Slices = dict[str, Callable[[torch.Tensor], torch.Tensor]]  # parameter name -> its share of the checkpoint's tensor
ELSEWHERE = "elsewhere"  # a layer another stage holds (SequenceState keeps no cache for it)


class Elsewhere(nn.Module):
    """A decoder layer held by another stage: the hidden state passes through unchanged (it is replaced by the
    one the previous stage sends before this stage's first layer)."""

    def forward(self, x: torch.Tensor, p) -> torch.Tensor:
        return x


class TensorShard:
    """The cuts of rank `rank` of `world`."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def heads(self, t: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
        """This rank's share of n equal groups (heads, or equal parts) along dim."""
        return t.unflatten(dim, (n, -1)).narrow(dim, self.rank * n // self.world, n // self.world).flatten(dim, dim + 1)

    def segments(self, t: torch.Tensor, sizes: list[int], groups: list[int], dim: int = 0) -> torch.Tensor:
        """This rank's share of each consecutive segment (its heads of q, of k, of v), joined."""
        return torch.cat([self.heads(s, g, dim) for s, g in zip(t.split(sizes, dim), groups)], dim)

    def vocab(self, t: torch.Tensor) -> torch.Tensor:
        """Rows [rank * s, (rank + 1) * s) of the head, s = ceil(V / world), the last share padded with zero rows
        (their logits are cut off after the gather)."""
        s = -(-t.shape[0] // self.world)
        part = t[self.rank * s:(self.rank + 1) * s]
        return torch.cat([part, part.new_zeros(s - part.shape[0], *t.shape[1:])]) if part.shape[0] < s else part

    def cut(self, model: q35.Qwen35Model) -> Slices:
        """Shrink the (meta) model to this rank's shares; the slice of each changed parameter."""
        slices: Slices = {}

        def take(owner: nn.Module, path: str, attr: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
            setattr(owner, attr, nn.Parameter(fn(getattr(owner, attr)), requires_grad=False))
            slices[f"{path}.{attr}" if path else attr] = fn

        N = self.world
        for path, m in model.named_modules():
            if isinstance(m, q35.Attention):
                nh, nkv = m.n_heads, m.n_kv
                take(m.q_proj, f"{path}.q_proj", "weight", lambda t, n=nh: self.heads(t, n))
                for name in ("k_proj", "v_proj"):
                    take(getattr(m, name), f"{path}.{name}", "weight", lambda t, n=nkv: self.heads(t, n))
                take(m.o_proj, f"{path}.o_proj", "weight", lambda t, n=nh: self.heads(t, n, 1))
                m.n_heads, m.n_kv = nh // N, nkv // N
            elif isinstance(m, q35.GatedDeltaNet):
                nk, nv = m.nk, m.nv
                sizes, groups = [m.key_dim, m.key_dim, m.value_dim], [nk, nk, nv]
                take(m.in_proj_qkv, f"{path}.in_proj_qkv", "weight", lambda t: self.segments(t, sizes, groups))
                take(m.conv1d, f"{path}.conv1d", "weight", lambda t: self.segments(t, sizes, groups))
                for name in ("in_proj_z", "in_proj_b", "in_proj_a"):
                    take(getattr(m, name), f"{path}.{name}", "weight", lambda t, n=nv: self.heads(t, n))
                for name in ("dt_bias", "A_log"):
                    take(m, path, name, lambda t, n=nv: self.heads(t, n))
                take(m.out_proj, f"{path}.out_proj", "weight", lambda t, n=nv: self.heads(t, n, 1))
                m.nk, m.nv = nk // N, nv // N
                m.key_dim, m.value_dim = m.nk * m.dk, m.nv * m.dv
                m.conv_dim = 2 * m.key_dim + m.value_dim
            elif isinstance(m, q35.MLP):
                for name in ("gate_proj", "up_proj"):
                    take(getattr(m, name), f"{path}.{name}", "weight", lambda t: self.heads(t, N))
                take(m.down_proj, f"{path}.down_proj", "weight", lambda t: self.heads(t, N, 1))
            elif isinstance(m, q35.Experts):
                take(m, path, "gate_up_proj", lambda t: torch.cat([self.heads(h, N, 1) for h in t.chunk(2, 1)], 1))
                take(m, path, "down_proj", lambda t: self.heads(t, N, 2))
        take(model.lm_head, "lm_head", "weight", self.vocab)
        return slices


def local_config(cfg, world: int):
    """The config of one rank's share of the heads (for its caches)."""
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // world,
                               num_key_value_heads=cfg.num_key_value_heads // world,
                               linear_num_key_heads=cfg.linear_num_key_heads // world,
                               linear_num_value_heads=cfg.linear_num_value_heads // world)


class DistributedRunner(Runner):
    """Rank `group.rank`'s runner: cuts the shard (shard(), at load), adds the collectives (prepare()), then lets the
    machine's runner (`inner`: cpu / cuda) prepare what is left, without its kernels that would run past a
    collective (whole layers under tensor parallel, the whole stack and the MTP draft chain under both)."""

    def __init__(self, inner: Runner, group: Group, config: ParallelConfig):
        super().__init__(group.device, inner.dtype, inner.quantization)
        self.inner, self.group, self.config = inner, group, config
        self.split = f"{'tensor parallel' if config.tensor > 1 else 'layer split'} rank {group.rank} of {group.world}"
        self.name = f"{inner.name}, {self.split}"
        if hasattr(inner, "skip_whole"):
            inner.skip_whole(layers=config.tensor > 1)
        self.max_drafts = inner.max_drafts

    @property
    def load_device(self) -> torch.device:
        return self.group.device

    def layers(self, n_layers: int) -> tuple[int, int]:
        return self.config.layer_ranges(n_layers)[self.group.rank] if self.config.stages else (0, n_layers)

    def shard(self, model: nn.Module) -> Slices:
        """Cut the freshly built (meta) model to this rank's part; the slice of each changed parameter."""
        if self.config.tensor > 1:
            return TensorShard(self.group.rank, self.group.world).cut(model)
        first, end = self.layers(len(model.model.layers))
        for i in range(len(model.model.layers)):
            if not first <= i < end:
                model.model.layers[i] = Elsewhere()
        if model.mtp is not None and self.group.rank != self.group.last:
            model.mtp.layers = nn.ModuleList(Elsewhere() for _ in model.mtp.layers)
            model.mtp.layer_types = [ELSEWHERE] * len(model.mtp.layers)
        return {}

    def prepare(self, model: nn.Module, quantizer: None = None) -> nn.Module:
        # quantizer: always None, a sharded load quantizing once loaded (Runner.load)
        group = self.group
        if self.config.tensor > 1:
            reduce = lambda module, args, out: group.reduce_sum(out)  # noqa: E731
            stacks = [model.model.layers] + ([model.mtp.layers] if model.mtp is not None else [])
            for layer in (layer for stack in stacks for layer in stack):
                layer.mixer.register_forward_hook(reduce)
                layer.mlp.register_forward_hook(reduce)
            vocab = model.cfg.vocab_size
            model.lm_head.register_forward_hook(lambda module, args, out: group.gather_last(out)[..., :vocab])
            cfg, types = local_config(model.cfg, group.world), model.cfg.layer_types
        else:
            cfg = model.cfg
            first, end = self.layers(len(model.model.layers))
            types = [t if first <= i < end else ELSEWHERE for i, t in enumerate(cfg.layer_types)]
            if group.rank > 0:
                model.model.layers[first].register_forward_pre_hook(
                    lambda module, args: (group.recv_like(args[0], group.rank - 1), *args[1:]))
            if group.rank < group.last:
                model.model.layers[end - 1].register_forward_hook(
                    lambda module, args, out: group.send(out, group.rank + 1))
            from_last = lambda module, args, out: group.broadcast(out, group.last)  # noqa: E731
            model.model.norm.register_forward_hook(from_last)
            if model.mtp is not None:
                model.mtp.register_forward_hook(from_last)
        # the head's dtype and device, not the tensor: inner.prepare may replace it (quantized weights)
        dtype, home = model.lm_head.weight.dtype, model.lm_head.weight.device
        model.new_state = lambda max_len, device=None: SequenceState(cfg, types, max_len, dtype, device or home)
        if model.mtp is not None:
            model.new_mtp_state = lambda max_len, device=None: SequenceState(cfg, model.mtp.layer_types, max_len,
                                                                             dtype, device or home)
        return self.inner.prepare(model)

    def release_state(self, state: SequenceState) -> None:
        self.inner.release_state(state)

    @property
    def step_row_block(self) -> int | None:
        return self.inner.step_row_block

    def describe(self) -> str:
        return f"{self.inner.describe()}, {self.split}"
