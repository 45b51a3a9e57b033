"""Suffix drafting: propose the continuation that most often followed the longest earlier match of the text's end.

The index is a suffix automaton over a token sequence (prompt + output of one request; or, for the server, the
outputs of earlier requests), extended token by token as the sequence grows, never rebuilt per step. Every state
holds a class of substrings with the same end positions; besides the automaton's usual links it keeps how often its
substrings occur (`count`), for the states whose shortest substring has at most DEPTH + 1 tokens: a new token adds one
occurrence to each state on the link path from the one holding the text's last DEPTH + 1 tokens, so an append costs
O(DEPTH) on top of the automaton's amortized O(1), and memory is O(tokens) (at most 2n states).

Drafting starts from the state holding the text's last <= DEPTH tokens, shortened along links until it has a
continuation (an earlier occurrence followed by something); its longest substring is the match. It then follows the
most frequent continuation, token by token, while the product of the continuations' frequencies stays >= P_MIN and
the draft is no longer than MATCH_FACTOR x the match length (a long match means the text is being copied; a short one
is weak evidence), as in Arctic Inference's suffix decoding (Oliaro et al., arXiv 2411.04975).

The server's drafter also matches against a bounded store of earlier requests' outputs (GlobalSuffixStore): an
automaton over the concatenated outputs, separated by -1, rebuilt from the most recent ones when it passes its token
budget (amortized O(1) per token; at most `capacity` tokens, about 500 bytes each in Python objects).
"""
from __future__ import annotations

from collections import deque

from mtpx.speculative.drafters import Draft, Drafter

DEPTH = 32  # longest context whose continuation counts are kept (a longer match still sets the draft's length cap)
P_MIN = 0.1  # draft while the estimated probability that every draft so far is right stays at least this
MATCH_FACTOR = 1.0  # draft at most this many tokens per token of match
MIN_EXPECTED = 1.0  # draft only where at least this many tokens are expected to be accepted (else a plain round)
SEPARATOR = -1  # between requests in the global store: never drafted, never matched


class SuffixIndex:
    """Suffix automaton of a growing token sequence with occurrence counts of contexts up to DEPTH tokens."""

    def __init__(self, depth: int = DEPTH) -> None:
        self.depth = depth
        self.next: list[dict[int, int]] = [{}]  # transitions: token -> state
        self.link: list[int] = [-1]  # suffix link: the state of the longest suffix in another class
        self.length: list[int] = [0]  # longest substring of the state
        self.count: list[int] = [0]  # occurrences (end positions); kept where the shortest substring <= depth + 1
        self.last = 0  # state of the whole sequence
        self.window = 0  # state of the sequence's last min(n, depth + 1) tokens
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def _new(self, length: int, link: int, nxt: dict[int, int], count: int) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.count.append(count)
        return len(self.length) - 1

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.append(t)

    def append(self, c: int) -> None:
        nxt, link, length = self.next, self.link, self.length
        cur = self._new(length[self.last] + 1, 0, {}, 0)
        p = self.last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # q holds longer strings too: split off the ones that now also end here
                clone = self._new(length[p] + 1, link[q], dict(nxt[q]), self.count[q])
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur
        self.n += 1
        if self.n <= self.depth + 1:
            w = cur
        else:  # the window's tokens plus c, then drop the oldest token if the class starts beyond depth + 1
            w = nxt[self.window][c]
            if length[link[w]] + 1 > self.depth + 1:
                w = link[w]
        self.window = w
        while w > 0:  # one more occurrence of every suffix up to depth + 1 tokens
            self.count[w] += 1
            w = link[w]

    def context(self) -> int:
        """The state of the sequence's last min(n, depth) tokens."""
        w = self.window
        if self.n > self.depth and self.length[self.link[w]] + 1 > self.depth:
            w = self.link[w]
        return w

    def ends(self) -> set[int]:
        """The states (with counts) that hold a suffix of the sequence: their count includes the occurrence at the
        end, which has no continuation."""
        out, w = set(), self.window
        while w > 0:
            out.add(w)
            w = self.link[w]
        return out

    def walk(self, state: int, matched: int, c: int) -> tuple[int, int]:
        """Matching statistics: (state, length) of the longest suffix of (text matched so far + c) that occurs in
        this index, from that of the text so far; lengths capped at depth so that counts stay kept."""
        nxt, link, length = self.next, self.link, self.length
        while state > 0 and c not in nxt[state]:
            state = link[state]
            matched = length[state]
        if c in nxt[state]:
            state, matched = nxt[state][c], matched + 1
        else:
            state, matched = 0, 0
        if matched > self.depth:
            matched = self.depth
            if length[link[state]] >= self.depth:
                state = link[state]
        return state, matched

    def propose(self, state: int, matched: int, k: int, ends: set[int] = frozenset(), p_min: float = P_MIN,
                factor: float = MATCH_FACTOR, trust: float = 1.0) -> tuple[list[int], float, int]:
        """Up to k tokens continuing the context `state` (`matched` tokens of it known to match); `ends`: the
        states whose count includes the index's own end (ends()); `trust`: a factor on every estimate (how well
        they came true so far). Returns (tokens, expected number of them accepted (the sum of the running products
        of the continuation frequencies, times trust), the match length)."""
        nxt, link, length, count = self.next, self.link, self.length, self.count
        while state > 0 and count[state] - (state in ends) <= 0:  # occurs only at the end: a shorter context
            state = link[state]
            matched = length[state]
        if state <= 0:
            return [], 0.0, 0
        # all of the state's substrings share its end positions, so the match is as long as its longest one
        # wherever the context came from the sequence itself
        match = max(matched, length[state]) if ends else matched
        cap = min(k, int(factor * match))
        out: list[int] = []
        prob, expected = trust, 0.0
        while len(out) < cap and state > 0:
            total = count[state] - (state in ends)
            if total <= 0:
                state = link[state]
                continue
            edges = nxt[state]
            c, u = max(edges.items(), key=lambda e: count[e[1]]) if len(edges) > 1 else next(iter(edges.items()))
            prob *= count[u] / total
            if c == SEPARATOR or prob < p_min:
                break
            out.append(c)
            expected += prob
            state = u
            if length[link[state]] + 1 > self.depth:  # keep the context within the counted depth
                state = link[state]
        return out, expected, match


class GlobalSuffixStore:
    """Earlier requests' outputs, for the server's suffix drafter: at most `capacity` tokens in one SuffixIndex;
    past that, the index is rebuilt from the most recent outputs that fill half of it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.outputs: deque[list[int]] = deque()
        self.index = SuffixIndex()
        self.version = 0  # changes with every addition: matching pointers into the index start over

    def add(self, tokens: list[int]) -> None:
        tokens = list(tokens[-(self.capacity - 1):]) if self.capacity > 1 else []  # room for its separator
        if not tokens:
            return
        if len(self.index) + len(tokens) + 1 > self.capacity:
            kept, size = deque(), len(tokens) + 1
            for out in reversed(self.outputs):
                if size + len(out) + 1 > self.capacity // 2:
                    break
                kept.appendleft(out)
                size += len(out) + 1
            self.outputs, self.index = kept, SuffixIndex()
            for out in kept:
                self.index.extend(out)
                self.index.append(SEPARATOR)
        self.outputs.append(tokens)
        self.index.extend(tokens)
        self.index.append(SEPARATOR)
        self.version += 1

    def nbytes(self) -> int:
        return _index_bytes(self.index)


def _index_bytes(index: SuffixIndex) -> int:
    """Rough memory of an index: Python dict entries and list slots (for the stats' drafter memory)."""
    return 100 * sum(len(d) for d in index.next) + 250 * len(index.next)


TRUST_PRIOR = 2.0  # tokens of prior evidence that the estimates are right, before a sequence's own rounds count


class _SuffixState:
    """One sequence's index, how well its drafts' estimates came true, and (with a global store) where its text's
    end matches in the store."""

    def __init__(self) -> None:
        self.index = SuffixIndex()
        self.global_state, self.global_matched, self.global_version, self.global_fed = 0, 0, -1, 0
        self.expected = self.accepted = 0.0  # over this sequence's suffix drafts that were verified
        self.pending = 0.0  # the estimate of the draft being verified

    @property
    def trust(self) -> float:
        """Accepted / expected tokens so far (at most 1): where the text stops repeating what came before (a DRY
        or repetition penalty, a model that paraphrases) the frequencies overstate acceptance, and drafts get
        shorter and rarer."""
        return min(1.0, (self.accepted + TRUST_PRIOR) / (self.expected + TRUST_PRIOR))


class SuffixDrafter(Drafter):
    """Drafts the most frequent continuation of the longest earlier match, from the sequence's own prompt and output
    (and a GlobalSuffixStore of earlier outputs, where given). Deterministic: q is one-hot."""
    name = "suffix"

    def __init__(self, store: GlobalSuffixStore | None = None, p_min: float = P_MIN,
                 factor: float = MATCH_FACTOR, min_expected: float = MIN_EXPECTED) -> None:
        self.store, self.p_min, self.factor, self.min_expected = store, p_min, factor, min_expected

    def state(self, seq) -> _SuffixState:
        """The sequence's index, brought up to date with its tokens (only the new ones are added)."""
        s = seq.lookup.get(self.name)
        if s is None:
            s = seq.lookup[self.name] = _SuffixState()
        s.index.extend(seq.tokens[len(s.index):])
        return s

    def start(self, seq, prompt_hidden):
        self.state(seq)

    def draft(self, seq, k: int) -> list[int]:
        """Up to k tokens where at least min_expected of them are expected to be accepted, else none."""
        tokens, expected = self.candidate(seq, k)
        return tokens if expected >= self.min_expected else []

    def candidate(self, seq, k: int) -> tuple[list[int], float]:
        """Up to k tokens and the expected number of them accepted (0 where nothing matches)."""
        if k <= 0:
            return [], 0.0
        s = self.state(seq)
        idx, trust = s.index, s.trust
        best = idx.propose(idx.context(), 0, k, idx.ends(), self.p_min, self.factor, trust)
        if self.store is not None and len(self.store.index):
            g = self._global(s, seq.tokens)
            other = self.store.index.propose(g.global_state, g.global_matched, k, frozenset(), self.p_min,
                                             self.factor, trust)
            if other[1] > best[1]:
                best = other
        s.pending = best[1] / trust if trust > 0 else 0.0
        return best[0], best[1]

    def _global(self, s: _SuffixState, tokens: list[int]) -> _SuffixState:
        """Move the sequence's matching pointer in the global store to its text's end (from its last DEPTH tokens
        again after the store changed)."""
        store = self.store.index
        if s.global_version != self.store.version:
            s.global_version, s.global_state, s.global_matched = self.store.version, 0, 0
            s.global_fed = max(0, len(tokens) - store.depth)
        for t in tokens[s.global_fed:]:
            s.global_state, s.global_matched = store.walk(s.global_state, s.global_matched, t)
        s.global_fed = len(tokens)
        return s

    def propose(self, seqs, ks):
        return [Draft(self.draft(seq, k)) for seq, k in zip(seqs, ks)]

    def on_accept(self, seqs, hidden, emitted, drafts):
        for seq, e, d in zip(seqs, emitted, drafts):
            s = seq.lookup.get(self.name)
            if s is not None and d.tokens and d.source in ("", self.name):
                s.expected += s.pending
                s.accepted += len(e) - 1
            if self.store is not None and seq.finished:  # what it generated may help the next requests
                self.store.add(seq.generated)

    def memory_bytes(self, seq):
        return self.sequence_bytes(seq) + (self.store.nbytes() if self.store else 0)

    def sequence_bytes(self, seq):
        s = seq.lookup.get(self.name) if seq.lookup else None
        return _index_bytes(s.index) if s is not None else 0
