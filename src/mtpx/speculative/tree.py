"""Draft trees (`--spec-draft-tree 3,2,1`): the shape of a tree, its layout in a verify pass, and the MTP layer's
tree drafting.

A shape gives the number of branches at each depth: 3,2,1 keeps the 3 likeliest first tokens, the 2 likeliest
second tokens among their children and the likeliest third token below those (likeliest by the product of the MTP
layer's probabilities along the path, as EAGLE-2 ranks its candidates), 6 nodes in all; a chain of k drafts is the
shape 1,1,...,1. Each node's children are drafted from that node's own MTP output, so every branch is what the
MTP layer would draft after that path.

A verify pass holds the last accepted token (row 0) and every node, depth first (a node right after its parent or
after a finished sibling branch): see models/common.py TreeRows for how attention and the Gated DeltaNet states follow
each branch, and SequenceState.keep_path for how the caches become those of the accepted path. Acceptance is in
tree_accept.py.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from mtpx.models.common import TreeRows
from mtpx.models.qwen3_5 import Qwen35Model


def tree_nodes(shape: Seq[int]) -> int:
    return sum(shape)


def supports_trees(model: object) -> bool:
    """Whether the model's family lays out tree passes (models/qwen3_5.py: its attention and Gated DeltaNet
    layers follow TreeRows; Qwen3-Next runs on it too)."""
    return isinstance(model, Qwen35Model)


def is_tree(choice: object) -> bool:
    """Whether a policy's choice (int k: a chain of k drafts; tuple: a shape) is a tree with some branching."""
    return isinstance(choice, tuple) and any(w > 1 for w in choice)


def verify_rows(parents: Seq[int], start: int) -> TreeRows:
    """The in-place layout of a verify pass from cache position `start`: row t's parent row parents[t] (-1 for row
    0), depth first. Row t sits at start + its depth, where a decode of its path would put it."""
    depth: list[int] = []
    for t, p in enumerate(parents):
        assert p < t, "a row comes after its parent"
        depth.append(depth[p] + 1 if p >= 0 else 0)
    at = tuple(start + d for d in depth)
    return TreeRows(tuple(parents), at, at, tuple(tuple(range(start, w + 1)) for w in at), start)


def pad_parents(parents: list[int], width: int) -> list[int]:
    """Row parents padded to `width` rows with siblings of the last row (they repeat its token): depth-first order
    holds and no path gets deeper, so padding needs no room beyond the tree's own."""
    return parents + [parents[-1]] * (width - len(parents))


@dataclass
class Node:
    token: int
    parent: int  # index of the parent node in the tree's list (-1: the root, the last accepted token)
    depth: int  # 1 for the root's children
    logp: float  # log probability of the path under the drafter
    children: list[int] = field(default_factory=list)
    slot: int = -1  # the MTP cache position of this node's drafting pass (once it has had one)
    x: torch.Tensor | None = None  # the MTP layer's output after this node


def depth_first(nodes: list[Node]) -> tuple[list[int], list[int]]:
    """Tokens and verify-row parents (row 0: the root) of the nodes in depth-first order, likeliest child first."""
    tokens, parents = [], []
    roots = sorted((i for i, n in enumerate(nodes) if n.parent < 0), key=lambda i: -nodes[i].logp)
    stack = [(i, 0) for i in reversed(roots)]
    while stack:
        i, parent_row = stack.pop()
        tokens.append(nodes[i].token)
        parents.append(parent_row)
        row = len(tokens)
        for c in sorted(nodes[i].children, key=lambda c: nodes[c].logp):
            stack.append((c, row))
    return tokens, parents


def draft_trees(drafter, seqs: list, shapes: list[tuple[int, ...]]) -> list:
    """A draft tree of shapes[b] for each sequence (an empty shape: no drafts), with the MTP drafter `drafter`:
    its catch-up on the accepted pairs, then one pass of the MTP layer per depth over every node of the depth before
    (all sequences at once), each node attending to the MTP cache and its own ancestors' drafting positions
    (TreeRows, masked). Afterwards the MTP cache is cut back to the accepted pairs, as after chain drafting: what it
    holds next round never depends on the tree."""
    from mtpx.speculative.drafters import Draft
    drafts = [Draft() for _ in seqs]
    active = [b for b, s in enumerate(shapes) if s]
    if not active:
        return drafts
    group = [seqs[b] for b in active]
    roots = drafter.catch_up(group)
    states = [s.draft.state for s in group]
    committed = [s.length for s in states]
    trees: list[list[Node]] = [[] for _ in group]
    frontier: list[list[int]] = [[-1] for _ in group]  # nodes of the last depth drafted (-1: the root)
    try:
        for depth in range(1, max(len(shapes[b]) for b in active) + 1):
            live = [i for i, b in enumerate(active) if depth <= len(shapes[active[i]])]
            if depth > 1:
                _mtp_pass(drafter, [(states[i], committed[i], trees[i], frontier[i], roots[i]) for i in live])
            rows = [(i, n) for i in live for n in frontier[i]]
            x = torch.stack([trees[i][n].x if n >= 0 else roots[i] for i, n in rows])
            logp = torch.log_softmax(drafter._logits(x).float(), dim=-1)
            width = max(shapes[active[i]][depth - 1] for i in live)
            top, ids = logp.topk(width, dim=-1)
            candidates: dict[int, list[tuple[float, int, int]]] = {i: [] for i in live}
            for r, (i, n) in enumerate(rows):
                base = trees[i][n].logp if n >= 0 else 0.0
                for lp, token in zip(top[r].tolist(), ids[r].tolist()):
                    if lp > float("-inf"):  # a reduced draft head's dropped ids
                        candidates[i].append((base + lp, n, token))
            for i in live:
                keep = sorted(candidates[i], key=lambda c: -c[0])[:shapes[active[i]][depth - 1]]
                frontier[i] = []
                for lp, parent, token in keep:
                    trees[i].append(Node(token, parent, depth, lp))
                    if parent >= 0:
                        trees[i][parent].children.append(len(trees[i]) - 1)
                    frontier[i].append(len(trees[i]) - 1)
    finally:
        for s, length in zip(states, committed):
            s.tree = None
            s.rollback(length)
    for i, b in enumerate(active):
        tokens, parents = depth_first(trees[i])
        drafts[b] = Draft(tokens, parents=parents)
    return drafts


def _mtp_pass(drafter, work: list[tuple]) -> None:
    """One MTP pass over the nodes of `frontier` (the last depth drafted) of each (state, committed length, tree,
    frontier, root output): each node's output, from its parent's output and its own token, goes to node.x."""
    width = max(len(f) for _, _, _, f, _ in work)
    hidden, tokens = [], []
    for state, committed, nodes, frontier, root in work:
        start = state.length
        positions, writes, keys, xs, toks = [], [], [], [], []
        for t in range(width):
            n = frontier[min(t, len(frontier) - 1)]
            node = nodes[n]
            path, a = [], node.parent
            while a >= 0:
                path.append(nodes[a].slot)
                a = nodes[a].parent
            real = t < len(frontier)  # padding rows repeat the last node, seen by no one
            positions.append(committed + node.depth - 1 if real else committed)
            writes.append(start + t)
            keys.append(tuple(path[::-1]) + (start + t,) if real else (start + t,))
            if real:
                node.slot = start + t
            xs.append(nodes[node.parent].x if node.parent >= 0 else root)
            toks.append(node.token)
        state.tree = TreeRows((-1,) * width, tuple(positions), tuple(writes), tuple(keys), committed)
        hidden.append(torch.stack(xs))
        tokens.append(toks)
    states = [w[0] for w in work]
    out = drafter._forward(torch.stack(hidden), torch.tensor(tokens, device=states[0].device), states, "step")
    for b, (state, _, nodes, frontier, _) in enumerate(work):
        state.tree = None
        for t, n in enumerate(frontier):
            nodes[n].x = out[b, t]
