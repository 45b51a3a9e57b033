"""Drafters: the model's own MTP layer, a separate draft model, and n-gram (prompt lookup); suffix drafting and
chains of drafters are in suffix.py and chain.py.

Every drafter implements one small interface. Per-sequence drafter state lives in `seq.draft`. Drafts only decide
how many tokens a verify pass can accept, never which tokens are emitted, so drafter passes need not be exact.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch

from mtpx import kernels
from mtpx.engine.constraints import mask_logits
from mtpx.engine.sequence import Sequence
from mtpx.models.linear import weight_bytes
from mtpx.models.interface import CausalLM
from mtpx.speculative.draft import Draft  # noqa: F401  (where the drafters' users import it from)
from mtpx.speculative.draft_head import DraftHead  # noqa: F401  (where the engine and tests import it from)
from mtpx.speculative.draft_state import DraftState
from mtpx.sampling import apply_penalties, sample, target_probs
from mtpx.state import SequenceState

PREFILL_ROWS = 8  # catch-up passes longer than this (the prompt) use the parallel prefill path
MTP_BACKLOG = 16  # after rounds without drafting, the MTP layer catches up on only this many latest positions
# The MTP layer reads only this many latest pairs of a long prompt: its pass over the prompt is paid at the first
# draft and grows with the prompt, while its drafts lean on the recent pairs. Drafts are only proposals, so the
# output is the same either way.
MTP_PROMPT_WINDOW = 2048


class Drafter(ABC):
    name = "drafter"
    # on_accept holds whatever tokens were verified, so a grammar may draft forced tokens after this drafter's own
    # (engine/constraints.py); False for a drafter whose state already consumed its own drafts
    takes_any_drafts = True

    def start(self, seq: "Sequence", prompt_hidden: torch.Tensor) -> None:
        """Called after the main model's prefill with its hidden states [n_prompt, H]."""

    @abstractmethod
    def propose(self, seqs: list["Sequence"], ks: list[int]) -> list[Draft]:
        """Up to ks[b] draft tokens for each sequence (fewer when p_min cuts drafting short)."""

    def on_accept(self, seqs: list["Sequence"], hidden: list[torch.Tensor], emitted: list[list[int]],
                  drafts: list[Draft]) -> None:
        """After verify: hidden [n + 1, H] at the positions of the last token and the n accepted drafts;
        emitted: the n accepted drafts plus the target's token."""

    def catch_up_positions(self, seqs: list["Sequence"]) -> int:
        """Positions a drafting round over `seqs` would now feed this drafter in catch-up passes over prompts it has
        not seen yet, beyond a round's usual work; 0 where there are none."""
        return 0

    def take_catch_up(self) -> tuple[int, float] | None:
        """(positions, seconds) of the catch-up passes over prompts since the last call, if any: what the policy
        prices the next one from."""
        return None

    def memory_bytes(self, seq: "Sequence") -> int:
        """The drafter's weights and what it holds for `seq` (sequence_bytes)."""
        return self.sequence_bytes(seq)

    def sequence_bytes(self, seq: "Sequence") -> int:
        """Memory held for `seq` alone (caches, pending states, indexes), weights and shared stores excluded: what a
        server slot costs beyond the main model's caches (docs/serving.md gives each drafter's bound)."""
        return 0


def _pick(logits: torch.Tensor, seq: "Sequence", p_min: float, drafted: list[int],
          argmax: bool) -> tuple[int | None, torch.Tensor | None]:
    """Choose a draft token from draft logits [V] that follow the sequence and its drafts so far: argmax when
    greedy or `argmax`, else sample from q (processed like the target, penalties included, and the grammar's mask
    where the sequence has one: its matcher has taken the drafts so far). None when the draft's top probability is
    below p_min, or the grammar leaves the drafter no token."""
    logits = apply_penalties(logits[None], seq.params, seq.tokens + drafted, seq.n_prompt)[0]
    if seq.constraint is not None:
        logits = mask_logits(logits[None], seq.constraint.allowed()[None])[0]
        if not bool(torch.isfinite(logits).any()):
            return None, None
    if seq.params.greedy or argmax:
        if p_min > 0 and torch.softmax(logits.float(), -1).max() < p_min:
            return None, None
        return kernels.argmax_rows(logits.reshape(1, -1))[0], None
    q = target_probs(logits[None], seq.params)[0]
    if p_min > 0 and q.max() < p_min:
        return None, None
    return sample(q, seq.gen), q


class _StatefulDrafter(Drafter):
    """Shared loop of the MTP and draft-model drafters: one catch-up pass over what the drafter has not seen yet
    (batched and padded across sequences), then single-token steps on its own drafts."""

    def __init__(self, p_min: float = 0.0):
        self.p_min = p_min
        self.caught_up: list = [0, 0.0]  # positions and seconds of catch-ups on prompts not yet taken

    def _pending_count(self, seq: "Sequence") -> int:
        """Positions the next catch-up feeds for `seq`: len(self._pending(seq)[1]), without joining the states."""
        return len(seq.draft.pending_tokens)

    def catch_up_positions(self, seqs):
        counts = [self._pending_count(s) for s in seqs if s.draft is not None and s.draft.committed == 0]
        return sum(n for n in counts if n > PREFILL_ROWS)

    def take_catch_up(self):
        done, self.caught_up = self.caught_up, [0, 0.0]
        return tuple(done) if done[0] else None

    @abstractmethod
    def _forward(self, x_prev: torch.Tensor | None, tokens: torch.Tensor, states: list[SequenceState],
                 mode: str) -> torch.Tensor: ...

    @abstractmethod
    def _pending(self, seq: "Sequence") -> tuple[torch.Tensor | None, list[int]]: ...

    @abstractmethod
    def _logits(self, x: torch.Tensor) -> torch.Tensor: ...

    # when sampling: draw each draft from the drafter's distribution q and verify by speculative sampling (True), or
    # draft its argmax and verify it as a deterministic draft, accepted with the target's probability of it (False)
    sampled_drafts = True

    def _drafts_by_argmax(self, seq: "Sequence", penalties: bool = False) -> bool:
        """Argmax drafts, no p_min and unpenalised (or `penalties`: the caller applies them): a draft is the argmax,
        and the full logits are never needed."""
        return (self.p_min == 0 and (seq.params.greedy or not self.sampled_drafts)
                and (penalties or not seq.params.penalized) and seq.constraint is None)

    def _argmax(self, x: torch.Tensor) -> list[int]:
        """Greedy draft tokens for drafter outputs x [R, H]."""
        return kernels.argmax_rows(self._logits(x))

    def sequence_bytes(self, seq):
        return seq.draft.nbytes() if seq.draft is not None else 0

    feeds_hidden = False  # each step takes the drafter's previous output (MTP), not only a token

    def catch_up(self, seqs: list["Sequence"]) -> list[torch.Tensor]:
        """Feed each sequence's pending positions (batched, padded) to the drafter and commit them: its output at
        the last one [H] per sequence, from which the first draft is drafted."""
        pend = [self._pending(s) for s in seqs]
        states = [s.draft.state for s in seqs]
        device = states[0].device
        m = max(len(t) for _, t in pend)
        tokens = torch.tensor([t + [t[-1]] * (m - len(t)) for _, t in pend], device=device)
        hid = None
        if pend[0][0] is not None:
            hid = torch.stack([torch.cat([h, h[-1:].expand(m - len(h), -1)]) for h, _ in pend])
        for s in states:
            s.mark()
        # priced only over prompts: a short backlog's pass costs more a position (its fixed part)
        prompts = m > PREFILL_ROWS and all(seq.draft.committed == 0 for seq in seqs)
        started = time.perf_counter()
        out = self._forward(hid, tokens, states, "prefill" if m > PREFILL_ROWS else "step")
        if prompts:
            if out.device.type == "cuda":  # rare (a prompt's catch-up): its time, not its launch's
                torch.cuda.synchronize(out.device)
            self.caught_up[0] += sum(len(t) for _, t in pend)
            self.caught_up[1] += time.perf_counter() - started
        x = []
        for i, seq in enumerate(seqs):
            n_b = len(pend[i][1])
            states[i].rollback(states[i].length - (m - n_b))
            seq.draft.committed = states[i].length
            seq.draft.clear_pending()
            x.append(out[i, n_b - 1])
        return x

    def propose(self, seqs, ks):
        drafts = [Draft() for _ in seqs]
        active = [b for b, k in enumerate(ks) if k > 0]
        if not active:
            return drafts
        x = self.catch_up([seqs[b] for b in active])
        states = [seqs[b].draft.state for b in active]
        device = states[0].device
        live = list(range(len(active)))
        probs: list[list[torch.Tensor]] = [[] for _ in active]
        taken: dict[int, int] = {}  # tokens each constrained sequence's matcher took while drafting
        plain_argmax = all(self._drafts_by_argmax(seqs[b]) for b in active)
        for j in range(max(ks[b] for b in active)):
            rows = torch.stack([x[i] for i in live])
            if plain_argmax:
                picks = [(t, None) for t in self._argmax(rows)]
            else:
                logits = self._logits(rows)
            next_live = []
            for row, i in enumerate(live):
                b = active[i]
                tok, q = picks[row] if plain_argmax else _pick(logits[row], seqs[b], self.p_min, drafts[b].tokens,
                                                                         not self.sampled_drafts)
                if tok is None:
                    continue
                c = seqs[b].constraint
                if c is not None and tok not in seqs[b].eos:  # the matcher follows the drafts (rolled back below)
                    if not c.accept(tok):
                        continue
                    taken[b] = taken.get(b, 0) + 1
                drafts[b].tokens.append(tok)
                if q is not None:
                    probs[i].append(q)
                if len(drafts[b].tokens) < ks[b] and (c is None or tok not in seqs[b].eos):
                    next_live.append(i)
            live = next_live
            if not live:
                break
            hid = torch.stack([x[i] for i in live])[:, None] if self.feeds_hidden else None
            toks = torch.tensor([[drafts[active[i]].tokens[-1]] for i in live], device=device)
            out = self._forward(hid, toks, [states[i] for i in live], "step")
            for row, i in enumerate(live):
                x[i] = out[row, 0]
        for i, b in enumerate(active):
            if probs[i]:
                drafts[b].probs = torch.stack(probs[i])
        for b, n in taken.items():
            seqs[b].constraint.rollback(n)
        return drafts


class MTPDrafter(_StatefulDrafter):
    """Drafts with the model's MTP layer: step 1 takes (main hidden state, accepted token); steps 2..k feed the
    layer its own output. Its KV cache holds pairs (h_i, t_{i+1}) of the accepted sequence. With a DraftHead, its
    logits come from a reduced vocabulary. When sampling it drafts its argmax too (as vLLM's MTP and EAGLE proposers
    do): the argmax chain runs in one call, which pays for its lower acceptance than drafting from q."""
    name = "mtp"
    sampled_drafts = False
    feeds_hidden = True

    def __init__(self, model: CausalLM, p_min: float = 0.0, head: DraftHead | None = None, tree_nodes: int = 0):
        super().__init__(p_min)
        self.tree_nodes = tree_nodes  # room in the MTP cache for drafting a tree of this many nodes
        if model.mtp is None:
            from mtpx.errors import RequestError
            raise RequestError("spec_type 'mtp' needs a checkpoint with an MTP layer (Qwen3.5's mtp.* tensors, or the "
                               "nextn layer after the main stack of GLM / DeepSeek); this one has none — add one with "
                               "`mtpx train-mtp` (Qwen3.5), or use spec_type 'ngram' or 'draft'")
        self.model = model
        self.head = head

    def start(self, seq, prompt_hidden):
        # pairs (h_i, t_{i+1}) of the prompt plus (h_last, first generated token): filled by the first propose,
        # after the first token has been emitted, so time-to-first-token is unchanged
        tokens = seq.tokens[1:seq.n_prompt + 1][-MTP_PROMPT_WINDOW:]
        pool = getattr(seq.state, "pool", None)  # a static main state: the MTP layer's caches static too
        # its cache holds the prompt's window and what follows it
        state = (pool.acquire("mtp", seq.max_len) if pool is not None
                 else self.model.new_mtp_state(seq.max_len - seq.n_prompt + len(tokens) + self.tree_nodes))
        seq.draft = DraftState(state, prompt_hidden[-len(tokens):], tokens)

    def _pending_count(self, seq):
        n = len(seq.draft.pending_tokens)
        # the policy chose not to draft for a while: catching up on every skipped position would cost an MTP pass
        # per generated token (measured: a quarter of the throughput at 4 streams on the demo model). Its cache
        # keeps its own positions, so it sees the recent pairs right after the older ones; drafts may be a little
        # worse, outputs are unchanged (verification decides)
        return min(n, MTP_BACKLOG) if seq.draft.committed > 0 else n

    def _pending(self, seq):
        d = seq.draft
        hidden, tokens = d.pending_hidden, d.pending_tokens
        n = self._pending_count(seq)
        return (hidden[-n:], tokens[-n:]) if n < len(tokens) else (hidden, tokens)

    def propose(self, seqs, ks):
        if len(seqs) == 1 and ks[0] > 0:  # one sequence, greedy: all drafts in one kernel call where it can run
            draft = self._greedy_chain(seqs[0], ks[0])
            if draft is not None:
                return [draft]
        return super().propose(seqs, ks)

    def _greedy_chain(self, seq: "Sequence", k: int) -> Draft | None:
        hidden, tokens = self._pending(seq)
        # the chain's kernel applies the counting penalties but not DRY, which changes few drafts: drafting with DRY
        # step by step raised the demo's mean acceptance length on held-out code by 0.01-0.02 at 25-30 % less speed
        if not self._drafts_by_argmax(seq, penalties=True) or hidden is None or len(tokens) > PREFILL_ROWS:
            return None
        d = seq.draft
        start = d.state.length
        d.state.mark()
        penalty = None
        if seq.params.counts_tokens:
            p = seq.params
            penalty = (*seq.penalties.of(seq.tokens, seq.n_prompt, self.model.cfg.vocab_size, hidden.device),
                       p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        # on a GPU, copied before the drafting passes are queued (a copy from the host waits for the queue)
        last = torch.tensor([seq.tokens[-1]], device=hidden.device) if hidden.device.type != "cpu" else None
        drafts = self.model.mtp_greedy_drafts(hidden, torch.tensor(tokens, device=hidden.device), d.state, k,
                                              self.head, penalty)
        if drafts is not None:
            d.committed = start + len(tokens)
            d.clear_pending()
        if isinstance(drafts, torch.Tensor):  # still on the device: the verify pass can follow them there
            last = last if last is not None else torch.tensor([seq.tokens[-1]], device=hidden.device)
            return Draft(drafts, verify_row=torch.cat([last, drafts]))
        return Draft(drafts) if drafts is not None else None

    def propose_tree(self, seqs: list["Sequence"], shapes: list[tuple[int, ...]]) -> list[Draft]:
        """A draft tree of each shape (branches per depth; speculative/tree.py)."""
        from mtpx.speculative.tree import draft_trees
        return draft_trees(self, seqs, shapes)

    def _forward(self, x_prev, tokens, states, mode):
        return self.model.mtp_forward(x_prev, tokens, states, mode)

    def _logits(self, x):
        return self.head(x) if self.head is not None else self.model.logits(x, step=True)

    def _argmax(self, x):
        return self.head.argmax(x).tolist() if self.head is not None else super()._argmax(x)

    def on_accept(self, seqs, hidden, emitted, drafts):
        for seq, h, e in zip(seqs, hidden, emitted):
            d = seq.draft
            d.state.rollback(d.committed)
            d.add_pending(h, e)
            # rounds without drafting would pile up a hidden state per token; the catch-up reads only the last
            # MTP_BACKLOG of them (and the prompt's, before the layer has seen it), so the rest can go
            d.trim(0 if d.committed else min(seq.n_prompt, MTP_PROMPT_WINDOW), MTP_BACKLOG)

    def memory_bytes(self, seq):
        weights = weight_bytes(self.model.mtp) + (self.head.nbytes() if self.head is not None else 0)
        return weights + self.sequence_bytes(seq)


class DraftModelDrafter(_StatefulDrafter):
    takes_any_drafts = False
    """A separate small model with the same tokenizer, with its own caches kept in step with accepted tokens."""
    name = "draft"

    def __init__(self, draft_model: CausalLM, p_min: float = 0.0):
        super().__init__(p_min)
        self.model = draft_model

    def start(self, seq, prompt_hidden):
        state = self.model.new_state(seq.max_len)
        self.model(torch.tensor([seq.tokens[:seq.n_prompt]], device=state.device), [state], "prefill")
        seq.draft = DraftState(state, None, [seq.tokens[-1]])

    def _pending(self, seq):
        return None, seq.draft.pending_tokens

    def _forward(self, x_prev, tokens, states, mode):
        return self.model(tokens, states, mode)

    def _logits(self, x):
        return self.model.logits(x, step=True)

    def on_accept(self, seqs, hidden, emitted, drafts):
        for seq, e in zip(seqs, emitted):
            d = seq.draft
            # the draft model has already consumed some of its own drafts; keep the accepted ones
            kept = min(len(e) - 1, d.state.length - d.committed)
            d.state.rollback(d.committed + kept)
            d.committed += kept
            d.add_pending(None, e[kept:])

    def memory_bytes(self, seq):
        return weight_bytes(self.model) + self.sequence_bytes(seq)


class NgramDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n from max down to min) in
    prompt + output and propose what followed it. Deterministic (q is one-hot)."""
    name = "ngram"

    def __init__(self, n_min: int = 1, n_max: int = 4):
        if not 1 <= n_min <= n_max:
            from mtpx.errors import RequestError
            raise RequestError(f"need 1 <= spec_ngram_min <= spec_ngram_max, got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs, ks):
        return [Draft(self.lookup(seq.tokens, k)) for seq, k in zip(seqs, ks)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        return self.match(tokens, k)[0]

    def match(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """The draft and the length n of the n-gram it follows (0: no match)."""
        if k <= 0:
            return [], 0
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k], n
        return [], 0
