"""Step passes at fixed addresses and shapes, replayed as CUDA graphs.

On a GPU, a step pass (decode, verify, an MTP draft) of a small model is a few hundred kernels of a few microseconds
each: launch-bound, far from the memory-bandwidth limit. Captured once as a CUDA graph, it replays in one launch.
Capture needs every tensor a pass reads or writes at a fixed address and every shape fixed, so a `StaticState`:
- keeps its caches at fixed addresses, with WIDTH spare positions, and its position in a device tensor;
- updates the Gated DeltaNet conv and recurrent states in place, and writes the state after each position of a pass
  into snapshot buffers: a rollback copies one back (a pass marks its start, so rollbacks stay within the last pass);
- runs every row-wise op of a pass (embedding, norms, matmuls, attention) on exactly WIDTH rows, the pass's T real
  positions plus padding. Only the recurrence loops over the T real ones, one token at a time. So a position's bits
  never depend on T: a verify row equals a decode row, and greedy speculation stays exact, by construction rather
  than by the row-invariance of any one kernel.
One graph is captured per (stack, T) on the second pass of that kind (the first runs eagerly and warms up), into a
memory pool shared by the state's graphs: outputs are copied out at once, so no graph's memory outlives its replay.
Off CUDA (or with graphs off) the same static code runs eagerly: that is how the CPU tests check it. The passes
themselves are runners/cuda.py's.
"""
from __future__ import annotations

from typing import Callable

import torch

from mtpx.config import ModelConfig
from mtpx.errors import RequestError
from mtpx.models.ops import compiling
from mtpx.state import SequenceState

WIDTH = 8  # rows of every static step pass: verify of up to 7 drafts, the drafters' catch-up of up to 8 positions


def is_static(states) -> bool:
    return bool(states) and all(isinstance(s, StaticState) for s in states)


class StaticState(SequenceState):
    """A sequence's caches at fixed addresses, for step passes replayable as CUDA graphs (one sequence per pass)."""
    static_conv: dict[int, torch.Tensor] = {}  # layer -> the fixed tensor (set after SequenceState's init)
    static_recurrent: dict[int, torch.Tensor] = {}

    def __init__(self, cfg: ModelConfig, layer_types: list[str], max_len: int, dtype: torch.dtype,
                 device: torch.device | str, rotary: tuple[torch.Tensor, torch.Tensor]):
        super().__init__(cfg, layer_types, max_len + WIDTH, dtype, device)  # padding rows write past the end
        self.max_len = max_len
        self.cache_len = max_len + WIDTH
        self.static_conv, self.static_recurrent = dict(self.conv), dict(self.recurrent)
        self.snap_conv = {i: c.new_zeros(WIDTH + 1, *c.shape) for i, c in self.conv.items()}
        self.snap_recurrent = {i: r.new_zeros(WIDTH + 1, *r.shape) for i, r in self.recurrent.items()}
        self.position = torch.zeros((), dtype=torch.long, device=self.device)  # = length, read by the passes
        self.rotary = rotary  # cos, sin tables covering cache_len positions (kept alive for the graphs)
        self.graphs: dict[tuple, tuple] = {}  # (stack, T) -> (graph, output) once captured
        self.graph_pool = None  # the graphs' memory pool: one per state (a pool dies with the last of its graphs)
        self.inputs: dict[tuple, list[torch.Tensor]] = {}
        self.warm: set[tuple] = set()
        self.pool: StatePool | None = None  # the pool it came from, which the sequence's drafter draws from too
        self.pool_key: tuple[str, int] | None = None
        self.use_graphs = False  # capture and replay CUDA graphs (set by the runner that made it)
        self.compiler: Callable[[Callable], Callable] | None = None  # compiles the passes' fusible op groups

    def reset(self) -> None:
        """Empty the caches for a new sequence, keeping their addresses (and the graphs captured on them)."""
        self.mark()
        for t in (*self.conv.values(), *self.recurrent.values()):
            t.zero_()
        self.length = self.snapshot_start = 0

    def mark(self) -> None:
        # eager passes (prefill) replace the state tensors: copy them back to the fixed addresses the graphs use
        for current, fixed in ((self.conv, self.static_conv), (self.recurrent, self.static_recurrent)):
            for i, f in fixed.items():
                if current[i] is not f:
                    f.copy_(current[i])
                    current[i] = f
        self.snapshot_start = self.length
        self.snapshots = {}

    def _restore(self, n: int) -> None:
        """Copy the states after the first n positions of the last pass back into the fixed tensors."""
        layers = list(self.conv)
        torch._foreach_copy_([self.conv[i] for i in layers] + [self.recurrent[i] for i in layers],
                             [self.snap_conv[i][n] for i in layers] + [self.snap_recurrent[i][n] for i in layers])

    def run_step(self, stack: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """Run `fn(*buffers, T)` over inputs [1, T, ...] padded to WIDTH rows; returns its output's first T rows
        (a copy). Advances the state by T positions; the pass's start becomes the rollback floor."""
        T = inputs[0].shape[1]
        if inputs[0].shape[0] != 1:
            raise RequestError("static step passes run one sequence at a time")
        if T > WIDTH:
            raise RequestError(f"a step pass of {T} positions is wider than the {WIDTH} a static pass holds "
                               f"(at most {WIDTH - 1} drafts per round)")
        self.check_room(T)
        self.mark()
        key = (stack, T)
        buffers = self.inputs.get(key)
        if buffers is None:
            buffers = self.inputs[key] = [x.new_zeros(1, WIDTH, *x.shape[2:]) for x in inputs]
        for buf, x in zip(buffers, inputs):
            buf[:, :T].copy_(x)
        self.position.fill_(self.length)
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
        elif self.use_graphs and key in self.warm:
            out = self._capture(key, fn, buffers, T)
        else:
            with compiling(self.compiler):
                out = fn(*buffers, T)
            self.warm.add(key)
        self.length += T
        return out[:, :T].clone()

    def _capture(self, key: tuple, fn: Callable, buffers: list[torch.Tensor], T: int) -> torch.Tensor:
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool), compiling(self.compiler):  # records only: nothing runs yet
            out = fn(*buffers, T)
        self.graphs[key] = (graph, out)
        graph.replay()
        return out


class StatePool:
    """Reuses StaticStates (and the graphs captured on them) across requests: a state per (stack, length bucket)
    that no running request holds. Capturing a stack's graphs costs tens of milliseconds, about a short request."""

    def __init__(self, make: Callable[[str, int], StaticState]):
        self.make = make
        self.free: dict[tuple[str, int], list[StaticState]] = {}

    def acquire(self, stack: str, max_len: int) -> StaticState:
        bucket = max(256, 1 << (max_len - 1).bit_length())  # attention reads the whole bucket: keep it tight
        free = self.free.setdefault((stack, bucket), [])
        state = free.pop() if free else self.make(stack, bucket)
        state.reset()
        state.max_len = max_len
        state.pool, state.pool_key = self, (stack, bucket)
        return state

    def release(self, state: StaticState) -> None:
        state.max_len = state.cache_len - WIDTH
        self.free.setdefault(state.pool_key, []).append(state)
