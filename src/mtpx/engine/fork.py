"""Parallel samples (n > 1) of one prompt: the prompt runs through the model once, and its caches are copied.

Every sample is a Sequence of its own (own caches, generator, grammar state, penalties, drafter state), so after the
first token they decode exactly as separate requests would, batched in the same rounds. Only the prompt's pass is
shared: it runs into the first sample's state; the attention caches' prompt positions and the Gated DeltaNet conv and
recurrent states are then copied into each other sample's (preallocated, possibly fixed-address) state, and each
sample picks its first token from the same hidden states with its own sampling settings. The copy is bit for bit, so
greedy samples equal a single request's output, and a sampled one equals a separate request with its seed.
"""
from __future__ import annotations

import time
from typing import Any

from mtpx.engine.sequence import Sequence
from mtpx.speculative.drafters import Drafter
from mtpx.speculative.loop import first_token, prompt_hidden
from mtpx.state import SequenceState


def copy_state(src: SequenceState, dst: SequenceState) -> None:
    """Make `dst` (a fresh state of the same stack and size) hold what `src` holds: its first src.length positions
    of every attention cache and its Gated DeltaNet states. In place, so a static state keeps its addresses."""
    src.mark()  # a static state: prefill's tensors back at the fixed addresses; either way no snapshots to copy
    dst.mark()
    capacity = getattr(src, "cache_len", src.max_len)  # positions each attention cache holds
    if set(src.kv) != set(dst.kv) or set(src.conv) != set(dst.conv):
        raise ValueError("copy_state: the states are of different layer stacks")
    for i, tensors in src.kv.items():
        for s, d in zip(tensors, dst.kv[i]):
            if s.shape != d.shape:
                raise ValueError(f"copy_state: cache shapes differ at layer {i}: {tuple(s.shape)} vs {tuple(d.shape)}")
            # copy only the prompt's positions where the position dimension can be told (the others are unused)
            dims = [k for k, size in enumerate(s.shape) if size == capacity]
            if len(dims) == 1:
                d.narrow(dims[0], 0, src.length).copy_(s.narrow(dims[0], 0, src.length))
            else:
                d.copy_(s)
    for i in src.conv:
        dst.conv[i].copy_(src.conv[i])
        dst.recurrent[i].copy_(src.recurrent[i])
    dst.length = src.length
    dst.mark()  # rollbacks stop at the prompt, as after its own prefill


def prefill_shared(model: Any, drafter: Drafter | None, seqs: list[Sequence]) -> list[list[int]]:
    """Prefill seqs (the samples of one prompt, each with its own fresh state) with ONE pass of the prompt through
    the model; returns the token(s) each emitted, as loop.prefill would for each alone."""
    first = seqs[0]
    if any(s.tokens[:s.n_prompt] != first.tokens[:first.n_prompt] for s in seqs[1:]):
        raise ValueError("prefill_shared: the sequences do not share one prompt")
    t0 = time.perf_counter()
    hidden = prompt_hidden(model, first)
    for seq in seqs[1:]:
        copy_state(first.state, seq.state)
    # each sample's first token and drafter start, from the same hidden states (the drafter copies nothing of the
    # main model's caches: the MTP layer reads the prompt's hidden states, a draft model prefills its own)
    return [first_token(model, drafter, seq, hidden, t0) for seq in seqs]
