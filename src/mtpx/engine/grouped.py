"""Drafting for a continuously batched set of sequences, whose pending catch-up lengths differ a lot."""
from __future__ import annotations

from mtpx.engine.sequence import Sequence
from mtpx.speculative.drafters import PREFILL_ROWS, Draft, Drafter, MTPDrafter


class GroupedDrafter(Drafter):
    """Wraps a stateful drafter so a batch never pads one sequence's catch-up pass far beyond its own length.

    The MTP / draft-model drafters first feed each sequence what they have not seen yet (a new prompt, or the tokens
    accepted since the last draft) in one pass padded to the longest pending length. In a continuously batched
    server these lengths differ a lot: a just-admitted sequence has its whole prompt pending, one near its end has
    little room left in its preallocated caches. One padded pass then costs B x prompt rows, or overflows a short
    sequence's cache (ValueError in check_room), and for a draft model with Gated DeltaNet layers a padded prefill
    pass cannot be rolled back at all. This wrapper calls the drafter on groups instead:
      - pending <= PREFILL_ROWS (the steady state): one group, padded in step mode, as long as it fits every cache;
      - longer pending lists: grouped by equal length (MTP: lengths within 2x, since its attention-only cache can
        be truncated after a padded prefill pass).
    Steady state is a single call, exactly as without the wrapper.
    """

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.takes_any_drafts = inner.takes_any_drafts
        self.name = inner.name
        self.pad_long = isinstance(inner, MTPDrafter)

    def start(self, seq, prompt_hidden):
        self.inner.start(seq, prompt_hidden)

    def on_accept(self, seqs, hidden, emitted, drafts):
        self.inner.on_accept(seqs, hidden, emitted, drafts)

    def memory_bytes(self, seq):
        return self.inner.memory_bytes(seq)

    def catch_up_positions(self, seqs):
        return self.inner.catch_up_positions(seqs)

    def take_catch_up(self):
        return self.inner.take_catch_up()

    def sequence_bytes(self, seq):
        return self.inner.sequence_bytes(seq)

    @staticmethod
    def _pending(seq) -> int:
        d = seq.draft
        return len(getattr(d, "pending_tokens", None) or []) if d is not None else 0

    def groups(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Indices of the sequences drafted together, one list per drafter call."""
        active = [b for b, k in enumerate(ks) if k > 0]
        pend = {b: self._pending(seqs[b]) for b in active}
        groups: list[list[int]] = []
        for b in sorted(active, key=lambda b: -pend[b]):
            g = groups[-1] if groups else None
            if g is not None:
                head = pend[g[0]]
                state = seqs[b].draft.state
                fits = state.length + head + ks[b] <= state.max_len
                close = head <= PREFILL_ROWS or pend[b] == head or (self.pad_long and 2 * pend[b] >= head)
                if fits and close:
                    g.append(b)
                    continue
            groups.append([b])
        return groups

    def propose_tree(self, seqs: list[Sequence], shapes: list[tuple[int, ...]]) -> list[Draft]:
        """Draft trees (MTP), grouped as propose groups chains; a group's room is the tree's node count."""
        ks = [sum(shape) for shape in shapes]
        if not any(ks) or any(getattr(s.draft, "state", None) is None for s in seqs):
            return self.inner.propose_tree(seqs, shapes)
        drafts = [Draft() for _ in seqs]
        for g in self.groups(seqs, ks):
            for b, d in zip(g, self.inner.propose_tree([seqs[b] for b in g], [shapes[b] for b in g])):
                drafts[b] = d
        return drafts

    def propose(self, seqs, ks):
        if not any(k > 0 for k in ks) or any(getattr(s.draft, "state", None) is None for s in seqs):
            return self.inner.propose(seqs, ks)
        groups = self.groups(seqs, ks)
        if len(groups) == 1:
            return self.inner.propose(seqs, ks)
        drafts = [Draft() for _ in seqs]
        for g in groups:
            for b, d in zip(g, self.inner.propose([seqs[b] for b in g], [ks[b] for b in g])):
                drafts[b] = d
        return drafts
