"""Per-sequence state: attention KV caches (preallocated), Gated DeltaNet conv + recurrent states, and rollback.

Step forwards (decode, verify, draft) keep the Gated DeltaNet state after every position they process, from the last
`mark()` on, so the speculative loop can roll back to any of them. A kept recurrent state is either a tensor (the
PyTorch path creates one per token anyway) or a function that rebuilds it (the fused CPU kernel writes only the
last position's state and replays the accepted positions on rollback).
"""
from __future__ import annotations

import torch

from mtpx.config import ModelConfig


class SequenceState:
    """Caches of one sequence for a stack of decoder layers (`layer_types`), e.g. the main model or its MTP layers.
    A layer of another kind (a layer another rank holds: runners/distributed.py) has no cache here."""

    def __init__(self, cfg: ModelConfig, layer_types: list[str], max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.max_len = max_len
        self.device = torch.device(device)
        self.length = 0  # tokens whose entries are valid in every cache
        self.kv: dict[int, tuple[torch.Tensor, ...]] = {}  # K, V (or a family's own cache tensors)
        self.conv: dict[int, torch.Tensor] = {}  # [conv_dim, kernel-1], model dtype
        self.recurrent: dict[int, torch.Tensor] = {}  # [value_heads, key_dim, value_dim], fp32
        # per-position snapshots since mark(): layer -> [(conv, recurrent) at the mark, after the next token, ...]
        self.snapshots: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.snapshot_start = 0
        self._tree_fields()
        conv_dim = 2 * cfg.linear_key_head_dim * cfg.linear_num_key_heads + cfg.linear_value_head_dim * cfg.linear_num_value_heads
        for i, kind in enumerate(layer_types):
            if kind == "full_attention":
                shape = (cfg.num_key_value_heads, max_len, cfg.head_dim)
                self.kv[i] = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            elif kind == "linear_attention":
                self.conv[i] = torch.zeros(conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
                self.recurrent[i] = torch.zeros(cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                                cfg.linear_value_head_dim, dtype=torch.float32, device=device)
        self.mark()

    @classmethod
    def with_caches(cls, kv: dict[int, list[tuple[int, ...]]], max_len: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> "SequenceState":
        """Attention-only caches of any shapes: layer -> the shapes of its cache tensors (each holding max_len
        positions along some dimension), e.g. K and V, or an MLA latent and its RoPE key. A family whose layers are
        not Qwen3.5's builds its states with this."""
        state = cls.__new__(cls)
        state.max_len, state.device, state.length = max_len, torch.device(device), 0
        state.conv, state.recurrent, state.snapshots, state.snapshot_start = {}, {}, {}, 0
        state.kv = {i: tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes) for i, shapes in kv.items()}
        state._tree_fields()
        state.mark()
        return state

    def _tree_fields(self) -> None:
        # the layout of the next step pass's rows where they form a draft tree (models/common.py TreeRows), and the
        # keys and values each row of such a pass computed, per attention layer: a verify pass lays each path out in
        # place, overwriting its siblings' entries, so keep_path takes the accepted rows' from here
        self.tree = None
        self.row_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"sequence of {self.length + n_new} tokens exceeds the cache size {self.max_len}")

    def mark(self) -> None:
        """Forget older snapshots: later rollbacks go no further back than the current length."""
        self.snapshot_start = self.length
        self.snapshots = {i: [(self.conv[i], self.recurrent[i])] for i in self.conv}

    def rollback(self, length: int) -> None:
        """Return to the state after `length` tokens. Attention caches are simply truncated; Gated DeltaNet states
        come from the snapshots kept since the last mark(), so `length` must not lie before it."""
        if length == self.length:
            return
        lowest = self.snapshot_start if self.conv else 0  # attention-only stacks (MTP) can truncate anywhere
        if not lowest <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: snapshots cover {self.snapshot_start}..{self.length}")
        if self.conv:
            self._restore(length - self.snapshot_start)
        self.length = length

    def keep_path(self, start: int, rows: list[int]) -> None:
        """After a step pass from `start` whose rows formed a tree laid out in place: keep the path of rows `rows`
        (row 0 first, each the parent of the next), as if only those positions had been decoded, in order. Their
        keys and values move to positions start, start + 1, ...; the Gated DeltaNet states become those after the
        path's last row."""
        idx = torch.tensor(rows, device=self.device)
        for i, (k, v) in self.row_kv.items():
            K, V = self.kv[i]
            K[:, start:start + len(rows)] = k[:, idx]
            V[:, start:start + len(rows)] = v[:, idx]
        base = start - self.snapshot_start  # snapshots[i][base + 1 + r]: the states after row r
        for i, snaps in self.snapshots.items():
            snaps[base + 1:] = [snaps[base + 1 + r] for r in rows]
        self.row_kv, self.tree = {}, None
        self.rollback(start + len(rows))

    def _restore(self, n: int) -> None:
        """Make the Gated DeltaNet states those after the first n positions since mark()."""
        for i, snaps in self.snapshots.items():
            conv, recurrent = snaps[n]
            if callable(recurrent):
                recurrent = recurrent()
                snaps[n] = (conv, recurrent)
            self.conv[i], self.recurrent[i] = conv, recurrent
            del snaps[n + 1:]

    def nbytes(self) -> int:
        tensors = [t for kv in self.kv.values() for t in kv] + list(self.conv.values()) + list(self.recurrent.values())
        return sum(t.numel() * t.element_size() for t in tensors)
