"""Suffix drafting: the automaton's counts and proposals against brute force, incremental updates, the global store's
bound, and the drafter's confidence."""
import random
from collections import Counter

import pytest

from mtpx.engine.params import SamplingParams
from mtpx.engine.sequence import Sequence
from mtpx.speculative.suffix import SEPARATOR, GlobalSuffixStore, SuffixDrafter, SuffixIndex


def texts(n: int, seed: int = 0):
    """Random token lists, a third of them periodic (loops, the worst case for the automaton's link paths)."""
    rng = random.Random(seed)
    for _ in range(n):
        vocab, size = rng.choice([2, 3, 5, 20]), rng.randint(1, 150)
        if rng.random() < 0.3:
            period = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
            yield (period * size)[:size], rng.choice([1, 2, 4, 8])
        else:
            yield [rng.randrange(vocab) for _ in range(size)], rng.choice([1, 2, 4, 8])


def occurrences(text, pattern):
    m = len(pattern)
    return sum(1 for j in range(len(text) - m + 1) if text[j:j + m] == pattern)


def test_counts_of_every_suffix_up_to_depth_are_exact_after_each_token():
    for text, depth in texts(150):
        idx = SuffixIndex(depth)
        for i, t in enumerate(text):
            idx.append(t)
            seen = text[:i + 1]
            w = idx.window
            while w > 0:  # every state holding a suffix of <= depth + 1 tokens
                shortest = idx.length[idx.link[w]] + 1
                assert shortest <= depth + 1
                assert idx.count[w] == occurrences(seen, seen[len(seen) - shortest:])
                w = idx.link[w]
            c = idx.context()
            assert idx.length[idx.link[c]] < min(len(seen), depth) <= idx.length[c]
        assert len(idx.length) <= 2 * len(text) + 1  # O(n) states, whatever the depth


def brute_next(text, depth):
    """The longest suffix (<= depth tokens) that occurred before with a continuation, and its continuations."""
    for m in range(min(depth, len(text) - 1), 0, -1):
        tail = text[-m:]
        follow = Counter(text[j + m] for j in range(len(text) - m) if text[j:j + m] == tail)
        if follow:
            return m, follow
    return 0, Counter()


def test_first_draft_is_the_most_frequent_continuation_of_the_longest_match():
    for text, depth in texts(200, seed=1):
        idx = SuffixIndex(depth)
        idx.extend(text)
        out, expected, match = idx.propose(idx.context(), 0, 1, idx.ends(), p_min=0.0, factor=100)
        m, follow = brute_next(text, depth)
        if not follow:
            assert out == [] and expected == 0
            continue
        top = max(follow.values())
        assert out and follow[out[0]] == top and expected == pytest.approx(top / sum(follow.values()))
        # the match may reach back past the counted depth: all of it occurred before, followed by something
        assert match >= m and occurrences(text[:-1], text[-match:]) >= 1


def test_a_copied_passage_is_drafted_as_long_as_the_match_allows():
    passage = list(range(100, 140))
    idx = SuffixIndex(8)
    idx.extend([1, 2] + passage + [3, 4] + passage[:20])  # copying the passage, 20 tokens in
    out, expected, match = idx.propose(idx.context(), 0, 16, idx.ends())
    assert out == passage[20:36] and expected == 16 and match == 20
    out, _, _ = idx.propose(idx.context(), 0, 16, idx.ends(), factor=0.5)
    assert out == passage[20:30]  # at most factor x match tokens
    out, expected, _ = idx.propose(idx.context(), 0, 16, idx.ends(), trust=0.5)
    assert expected == 8  # every estimate halved


def test_drafts_stop_where_the_continuation_becomes_uncertain():
    idx = SuffixIndex()
    idx.extend([7, 8, 9, 1] + [7, 8, 9, 2] + [7, 8, 9, 3] + [5, 7, 8])
    out, expected, _ = idx.propose(idx.context(), 0, 8, idx.ends(), p_min=0.5)
    assert out == [9]  # then 1, 2 or 3: a third each
    out, expected, _ = idx.propose(idx.context(), 0, 8, idx.ends(), p_min=0.3)
    assert len(out) == 2 and expected == pytest.approx(1 + 1 / 3)


def test_matching_statistics_against_another_index():
    rng = random.Random(3)
    for _ in range(100):
        store, depth = [rng.randrange(3) for _ in range(rng.randint(1, 80))], rng.choice([2, 4, 8])
        idx = SuffixIndex(depth)
        idx.extend(store)
        query = [rng.randrange(3) for _ in range(rng.randint(1, 40))]
        state = matched = 0
        for i, t in enumerate(query):
            state, matched = idx.walk(state, matched, t)
            longest = max((m for m in range(min(depth, i + 1), 0, -1) if occurrences(store, query[i + 1 - m:i + 1])),
                          default=0)
            assert matched == longest
            assert idx.length[idx.link[state]] < matched <= idx.length[state] or matched == state == 0


def sequence(tokens, n_prompt=None):
    return Sequence(tokens=list(tokens), n_prompt=n_prompt or len(tokens), max_new=64, params=SamplingParams(),
                    eos=set(), state=None, max_len=256)


def test_drafter_indexes_only_new_tokens_and_learns_from_its_rounds():
    d = SuffixDrafter()
    seq = sequence([1, 2, 3, 4, 5, 6, 9, 1, 2, 3])
    d.start(seq, None)
    index = seq.lookup["suffix"].index
    assert len(index) == 10
    assert d.propose([seq], [3])[0].tokens == [4, 5, 6]
    seq.tokens += [4, 5]
    appended = []
    original = index.append
    index.append = lambda t: (appended.append(t), original(t))[1]
    d.propose([seq], [3])
    assert appended == [4, 5]  # incremental: only the tokens since the last round
    s = seq.lookup["suffix"]
    trust = s.trust
    for _ in range(5):  # drafts that keep failing make the drafter trust its estimates less, then stop drafting
        draft = d.propose([seq], [4])[0]
        d.on_accept([seq], [None], [[0]], [draft])
    assert s.trust < trust and d.propose([seq], [4])[0].tokens == []


def test_global_store_keeps_at_most_its_capacity_and_serves_other_requests():
    store = GlobalSuffixStore(capacity=100)
    rng = random.Random(5)
    for i in range(30):
        store.add([rng.randrange(50) for _ in range(rng.randint(5, 40))])
        assert len(store.index) <= 100 and sum(len(o) + 1 for o in store.outputs) == len(store.index)
    assert store.index.length[store.index.last] == len(store.index)
    store.add(list(range(200, 240)))  # the newest output is always kept
    assert store.outputs[-1] == list(range(200, 240))
    small = GlobalSuffixStore(capacity=10)
    small.add(list(range(30)))  # longer than the store: its end
    assert small.outputs[-1] == list(range(21, 30)) and len(small.index) == 10
    d = SuffixDrafter(store)
    seq = sequence([9, 9, 200, 201, 202, 203])  # a new request starts the way the stored output did
    assert d.propose([seq], [5])[0].tokens == [204, 205, 206, 207]  # at most one token per matched token
    assert SEPARATOR not in d.propose([sequence([236, 237, 238, 239])], [8])[0].tokens
    done = sequence([1, 2, 3], n_prompt=1)
    done.finish_reason = "stop"
    d.on_accept([done], [None], [[3]], [d.propose([done], [1])[0]])
    assert store.outputs[-1] == [2, 3]  # a finished request's output joins the store
