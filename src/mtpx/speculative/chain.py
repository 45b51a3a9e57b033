"""A chain of drafters (`--spec-type mtp,ngram`, llama.cpp's `draft-mtp,ngram-mod`): each round, for each
sequence, the first lookup drafter with a confident proposal drafts, else the model drafter.

Lookup drafters (n-gram, suffix) read only the text, cost next to nothing, and know when they have something: an
n-gram match of at least NGRAM_CONFIDENT tokens, a suffix match whose continuation is expected to be accepted for at
least suffix.MIN_EXPECTED tokens. They are tried in the order given. The model drafter (MTP or a draft model) always
has a proposal, so it drafts where none of them is confident, wherever it stands in the list (first, it would leave
the others nothing).

The model drafter's state stays consistent through rounds it sits out: it sees every round's on_accept (the
accepted positions' hidden states and tokens), which it keeps as pending pairs and feeds to its layer the next time
it drafts (the MTP drafter catches up on the last MTP_BACKLOG of them), exactly as after a round where the policy
chose not to draft. Lookup drafters index the sequence's tokens themselves, so they need no catch-up.
"""
from __future__ import annotations

from mtpx.speculative.drafters import Draft, Drafter, NgramDrafter

NGRAM_CONFIDENT = 2  # n-gram: a match of at least this many tokens (one token matches almost anywhere)


class ChainDrafter(Drafter):
    """Lookup drafters in priority order, then (optionally) one model drafter whose state lives in `seq.draft`."""

    def __init__(self, lookups: list[Drafter], model: Drafter | None = None) -> None:
        self.lookups = list(lookups)
        self.model = model
        self.name = ",".join([d.name for d in self.lookups] + ([model.name] if model is not None else []))
        # a draft model's state consumes its own drafts; a grammar's forced tokens cannot follow those
        self.takes_any_drafts = model is None or model.takes_any_drafts

    def start(self, seq, prompt_hidden):
        for d in self.lookups:
            d.start(seq, prompt_hidden)
        if self.model is not None:
            self.model.start(seq, prompt_hidden)

    def lookup(self, seq, k: int) -> Draft | None:
        """The first confident lookup drafter's proposal of up to k tokens, or None."""
        for d in self.lookups:
            if isinstance(d, NgramDrafter):
                tokens, n = d.match(seq.tokens, k)
                confident = n >= NGRAM_CONFIDENT or (n > 0 and self.model is None)
            else:
                tokens = d.propose([seq], [k])[0].tokens
                confident = bool(tokens)
            if tokens and confident:
                return Draft(tokens, source=d.name)
        return None

    def propose(self, seqs, ks, lookup_ks: list[int] | None = None):
        """ks: the most drafts of each sequence's model drafter (the policy's k); lookup_ks: of its lookup
        drafters (default ks; the loop gives n_max, so that a confident lookup drafts as far as its match goes)."""
        lookup_ks = ks if lookup_ks is None else lookup_ks
        drafts: list[Draft] = [Draft() for _ in seqs]
        rest = []
        for b, (seq, k) in enumerate(zip(seqs, lookup_ks)):
            found = self.lookup(seq, k) if k > 0 else None
            if found is not None:
                drafts[b] = found
            elif ks[b] > 0:
                rest.append(b)
        if self.model is not None and rest:
            for b, d in zip(rest, self.model.propose([seqs[b] for b in rest], [ks[b] for b in rest])):
                d.source = d.source or self.model.name
                drafts[b] = d
        return drafts

    def catch_up_positions(self, seqs):
        return self.model.catch_up_positions(seqs) if self.model is not None else 0

    def take_catch_up(self):
        return self.model.take_catch_up() if self.model is not None else None

    def is_lookup(self, draft: Draft) -> bool:
        """Whether a lookup drafter (not the model drafter) proposed `draft`."""
        return any(draft.source == d.name for d in self.lookups)

    def on_accept(self, seqs, hidden, emitted, drafts):
        for d in self.lookups:
            d.on_accept(seqs, hidden, emitted, drafts)
        if self.model is not None:
            self.model.on_accept(seqs, hidden, emitted, drafts)

    def memory_bytes(self, seq):
        return sum(d.memory_bytes(seq) for d in self.lookups) + (self.model.memory_bytes(seq) if self.model else 0)

    def sequence_bytes(self, seq):
        return sum(d.sequence_bytes(seq) for d in [*self.lookups, *([self.model] if self.model else [])])
