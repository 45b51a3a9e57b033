"""The decode loop: prefill, then rounds of draft → verify → accept → rollback, for a batch of sequences.

Plain decoding is the same loop with no drafter (k = 0): verify is then a one-token decode step. Every round:
  drafts  = drafter.propose(seqs, ks)                 MTP layer on its own output | draft model | n-gram | suffix
                                                       | a chain of these (speculative/chain.py)
  hidden  = model([last, d1..dk], step mode)           one forward, per-position recurrent states kept
  n, tok  = accept(...)                                greedy prefix match or rejection sampling
  state.rollback(L + 1 + n)                            truncate attention, pick the recurrent state at position n
  drafter.on_accept(...)                               keep the drafter in step with what was accepted
A round where the policy chose a tree shape drafts a tree with the MTP layer instead (tree_round): one forward over
every node, the accepted path found by tree_accept.py, the caches moved to that path (SequenceState.keep_path).
"""
from __future__ import annotations

import time

import torch

from mtpx.engine.constraints import mask_logits
from mtpx.engine.sequence import Sequence
from mtpx.models.qwen3_5 import Qwen35Model
from mtpx.sampling import accept, apply_penalties, choose
from mtpx.speculative.chain import ChainDrafter
from mtpx.speculative.drafters import Draft, Drafter
from mtpx.speculative.policy import DraftPolicy
from mtpx.speculative.tree import is_tree, pad_parents, verify_rows
from mtpx.speculative.tree_accept import accept_tree, first_children


def prefill(model: Qwen35Model, drafter: Drafter | None, seq: Sequence) -> list[int]:
    """Run the prompt through the main model and pick the first token. Returns the emitted token(s)."""
    t0 = time.perf_counter()
    return first_token(model, drafter, seq, prompt_hidden(model, seq), t0)


def prompt_hidden(model: Qwen35Model, seq: Sequence) -> torch.Tensor:
    """The prompt's pass through the main model into seq.state: its hidden states [n_prompt, H]."""
    prompt = torch.tensor([seq.tokens[:seq.n_prompt]], device=seq.state.device)
    return model(prompt, [seq.state], "prefill")[0]


def first_token(model: Qwen35Model, drafter: Drafter | None, seq: Sequence, hidden: torch.Tensor,
                t0: float) -> list[int]:
    """Pick the first token after the prompt's hidden states [n_prompt, H] (seq.state already holds the prompt),
    and start the drafter. Apart from prefill, engine/fork.py calls it for each sample sharing one prompt pass."""
    logits = model.logits(hidden[-1]).float()
    target = apply_penalties(logits[None], seq.params, seq.tokens, seq.n_prompt, history=seq.penalties)
    if seq.constraint is not None:
        target = mask_logits(target, seq.constraint.allowed()[None])
    first = choose(target[0], seq.params, seq.gen)
    emitted = seq.append([first])
    if seq.params.logprobs is not None:
        record_logprobs(seq, target, emitted)
    t1 = time.perf_counter()
    seq.stats.prefill_s += t1 - t0
    if drafter is not None and not seq.finished:
        drafter.start(seq, hidden)
        seq.stats.draft_s += time.perf_counter() - t1
    return emitted


def record_logprobs(seq: Sequence, target: torch.Tensor, tokens: list[int]) -> None:
    """Log-probabilities of tokens[j] under processed logits row j (penalties and grammar mask applied), and the
    seq.params.logprobs most likely ids of that row. Each row on its own, as a plain decode step has it: with
    speculation on or off the same tokens get the same values."""
    top = seq.params.logprobs
    for j, t in enumerate(tokens):
        row = torch.log_softmax(target[j:j + 1].float(), -1)[0]
        best = []
        if top:
            values, ids = row.topk(top)
            best = list(zip(ids.tolist(), values.tolist()))
        seq.logprobs.append((float(row[t]), best))


def room(seqs: list[Sequence]) -> list[int]:
    """Drafts each sequence can still take: tokens it may generate after this round's own, within its caches."""
    return [max(min(s.max_new - len(s.generated) - 1, s.max_len - len(s.tokens) - 1), 0) for s in seqs]


def choose_k(policy: DraftPolicy, drafter: Drafter, seqs: list[Sequence], room_left: list[int]) -> int | tuple:
    """The policy's option for the next round, given what the drafter would pay up front and the tokens left
    (room_left: room(seqs))."""
    return policy.next_k(len(seqs), drafter.catch_up_positions(seqs), max(room_left) + 1)


def decode_round(model: Qwen35Model, drafter: Drafter | None, policy: DraftPolicy | None,
                 seqs: list[Sequence]) -> list[list[int]]:
    """One draft → verify → accept → rollback round for every sequence; returns the tokens each one emitted."""
    t0 = time.perf_counter()
    ks = [0] * len(seqs)
    room_left = room(seqs)
    if drafter is not None and policy is not None:
        k = choose_k(policy, drafter, seqs, room_left)
        if is_tree(k):
            if hasattr(drafter, "propose_tree") and all(s.constraint is None for s in seqs):
                return tree_round(model, drafter, policy, seqs, k, room_left, t0)
            k = len(k)  # a grammar drafts chains (its forced tokens follow one path)
        ks = [min(k, r) for r in room_left]
    # a chain's lookup drafters (suffix drafting is one, alone) draft where they are confident, as many tokens as
    # their match supports up to n_max, whatever k the policy chose: lengths that vary from round to round leave
    # the policy nothing to measure, so it sees only the model drafter's rounds (see below)
    chain = drafter if isinstance(drafter, ChainDrafter) and policy is not None else None
    if chain is not None:
        drafts = chain.propose(seqs, ks, [min(policy.n_max, r) for r in room_left])
    else:
        drafts = drafter.propose(seqs, ks) if drafter is not None and any(ks) else [Draft() for _ in seqs]
    masks = [None] * len(seqs)
    for b, s in enumerate(seqs):  # a grammar: drafts cut at the first forbidden token, a mask for each verify row
        if s.constraint is not None:
            d = drafts[b]
            forced = ks[b] if drafter is not None and drafter.takes_any_drafts and d.probs is None else 0
            kept, masks[b] = s.constraint.masks(d.tokens, s.eos, forced)
            if kept != d.tokens:
                drafts[b] = Draft(kept, d.probs[:len(kept)] if d.probs is not None and kept else None, d.source)
    t1 = time.perf_counter()
    for s in seqs:
        s.state.mark()
    on_device = drafts[0].verify_row if len(seqs) == 1 else None
    if on_device is not None:  # drafts still on the device: verify them there, the pass queued behind the
        # drafting passes; the host first waits when it reads the drafts, below
        batch = on_device[None]
    else:
        rows = [[s.tokens[-1]] + d.tokens for s, d in zip(seqs, drafts)]
        width = max(map(len, rows))
        batch = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=seqs[0].state.device)
    hidden = model(batch, [s.state for s in seqs], "step")
    logits = model.logits(hidden, step=True).float()
    if on_device is not None:
        rows, width = [[seqs[0].tokens[-1]] + drafts[0].tokens], batch.shape[1]
    emitted, accepted_hidden, n_accepted, accepted_tokens = [], [], [], []
    for b, (s, d) in enumerate(zip(seqs, drafts)):
        start = s.state.length - width
        target = apply_penalties(logits[b, :len(rows[b])], s.params, s.tokens, s.n_prompt, d.tokens, s.penalties)
        if masks[b] is not None:
            target = mask_logits(target, masks[b])
        n, tok = accept(target, d.tokens, d.probs, s.params, s.gen, s.synthetic_rates)
        s.state.rollback(start + 1 + n)
        s.stats.record(len(d.tokens), n, d.source or drafter.name if drafter is not None else "")
        accepted_tokens.append(d.tokens[:n] + [tok])
        emitted.append(s.append(accepted_tokens[-1]))
        if s.params.logprobs is not None:
            record_logprobs(s, target, emitted[-1])
        accepted_hidden.append(hidden[b, :n + 1])
        n_accepted.append(n)
    t2 = time.perf_counter()
    if drafter is not None:
        drafter.on_accept(seqs, accepted_hidden, accepted_tokens, drafts)
    t3 = time.perf_counter()
    for s in seqs:
        s.stats.draft_s += (t1 - t0 + t3 - t2) / len(seqs)
        s.stats.verify_s += (t2 - t1) / len(seqs)
    if policy is not None and drafter is not None:
        policy.observe_catch_up(drafter.take_catch_up())
        ruled = [b for b, d in enumerate(drafts) if chain is None or not chain.is_lookup(d)]
        if ruled:
            policy.observe(len(seqs), [len(drafts[b].tokens) for b in ruled], [n_accepted[b] for b in ruled],
                           t1 - t0 + t3 - t2, t2 - t1, started=t0, ended=t3)
        else:  # a round of lookup drafts only: neither a sample of the model drafter's cost nor a gap between its rounds
            policy.skip_gap()
    return emitted


def tree_round(model: Qwen35Model, drafter: Drafter, policy: DraftPolicy, seqs: list[Sequence],
               shape: tuple[int, ...], room_left: list[int], t0: float) -> list[list[int]]:
    """decode_round with a draft tree of `shape` (branches per depth, cut to each sequence's room) per sequence."""
    drafts = drafter.propose_tree(seqs, [shape[:r] for r in room_left])
    t1 = time.perf_counter()
    parents = [[-1] + (d.parents if d.parents is not None else list(range(len(d.tokens)))) for d in drafts]
    width = max(map(len, parents))
    rows = [[s.tokens[-1]] + d.tokens for s, d in zip(seqs, drafts)]
    starts = [s.state.length for s in seqs]
    for s, p in zip(seqs, parents):
        s.state.mark()
        s.state.tree = verify_rows(pad_parents(p, width), s.state.length)
    batch = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=seqs[0].state.device)
    try:
        hidden = model(batch, [s.state for s in seqs], "step")
    finally:
        for s in seqs:
            s.state.tree = None
    logits = model.logits(hidden, step=True).float()
    emitted, accepted_hidden, accepted_tokens, depths, n_accepted, chains = [], [], [], [], [], ([], [])
    for b, (s, d) in enumerate(zip(seqs, drafts)):
        path, tok, targets = accept_tree(logits[b, :len(rows[b])], d.tokens, parents[b][1:], s)
        s.state.keep_path(starts[b], path)
        n = len(path) - 1
        depth = len(shape[:room_left[b]]) if d.tokens else 0
        s.stats.record(depth, n, drafter.name, drafted=len(d.tokens))
        accepted_tokens.append([rows[b][r] for r in path[1:]] + [tok])
        emitted.append(s.append(accepted_tokens[-1]))
        if s.params.logprobs is not None:
            record_logprobs(s, targets, emitted[-1])
        accepted_hidden.append(hidden[b, path])
        depths.append(depth)
        n_accepted.append(n)
        for part, value in zip(chains, first_children(parents[b][1:], path)):
            part.append(value)
    t2 = time.perf_counter()
    drafter.on_accept(seqs, accepted_hidden, accepted_tokens, drafts)
    t3 = time.perf_counter()
    for s in seqs:
        s.stats.draft_s += (t1 - t0 + t3 - t2) / len(seqs)
        s.stats.verify_s += (t2 - t1) / len(seqs)
    policy.observe_catch_up(drafter.take_catch_up())
    policy.observe(len(seqs), depths, n_accepted, t1 - t0 + t3 - t2, t2 - t1, started=t0, ended=t3, tree=shape,
                   chains=chains)
    return emitted
