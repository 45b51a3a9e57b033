"""Sampling with draft trees is distributed exactly as plain sampling (multi-draft rejection over siblings):
chi-square on the joint law of the first three tokens, a reduced case of test_distribution.py's."""
from collections import Counter

from mtpx.speculative.drafters import Draft, Drafter

from test_distribution import assert_same_distribution, joint_counts, peaked  # noqa: F401 (a fixture)

SAMPLES = 1000
PROMPT = [5, 17, 42, 99, 7]
# likely continuations of the peaked model at T = 0.5 after its usual first token (198): second tokens 210 (~65 %),
# 301, 193; third tokens after 210: 341 (~40 %), 264. Placed so that first, second and third siblings are accepted
TREE = [(301, 0), (210, 0), (264, 2), (341, 2), (193, 0)]  # (token, parent row) depth first


class FixedTreeDrafter(Drafter):
    """Proposes TREE (cut to the depth the shape allows) every round, whatever the text: deterministic drafts."""

    def __init__(self):
        self.walks = Counter()

    def propose(self, seqs, ks):
        raise AssertionError("a tree round drafts with propose_tree")

    def propose_tree(self, seqs, shapes):
        drafts = []
        for shape in shapes:
            depth = {0: 0}
            kept = []
            for token, parent in TREE:
                if parent in depth and depth[parent] < len(shape):
                    kept.append((token, parent))
                    depth[len(kept)] = depth[parent] + 1
            rows = {old: new for new, old in enumerate([0] + [i + 1 for i, (t, p) in enumerate(TREE)
                                                               if (t, p) in kept])}
            drafts.append(Draft([t for t, _ in kept], parents=[rows[p] for _, p in kept]))
        return drafts

    def on_accept(self, seqs, hidden, emitted, drafts):
        self.walks.update(tuple(e[:-1]) for e in emitted)


def test_tree_rejection_sampling_preserves_joint_distribution(peaked):  # noqa: F811
    """T = 0.5, 4-token outputs (the first round has room for the tree's two depths), law of the first three."""
    kw = dict(temperature=0.5)
    drafter = FixedTreeDrafter()
    plain = joint_counts(peaked, PROMPT, kw, None, 0, seed=21, samples=SAMPLES)  # the same law, one round less
    spec = joint_counts(peaked, PROMPT, kw, drafter, (3, 2), seed=22, samples=SAMPLES, max_tokens=4)
    assert_same_distribution(plain, spec)
    # every kind of walk happened: a first, second and third sibling accepted, a second child below one, none
    assert {(301,), (210,), (193,), (210, 341), ()} <= {w for w, n in drafter.walks.items() if n >= 5}
