"""Draft trees: their layout in a verify pass, greedy output identical to plain decoding (MTP trees and trees that
hold the right token at varying places, dense and MoE, batched), the caches after tree rounds equal plain
decoding's, stats, and the errors a bad shape gets."""
import argparse
import random

import pytest
import torch

import mtpx
from mtpx.engine.flags import add_spec_arguments, spec_from_args
from mtpx.engine.params import FieldError, SpecConfig, spec_from_json
from mtpx.sampling import SamplingParams
from mtpx.speculative.drafters import Draft, Drafter, MTPDrafter
from mtpx.speculative.loop import decode_round, prefill
from mtpx.speculative.policy import DraftPolicy
from mtpx.speculative.tree import Node, depth_first, pad_parents, verify_rows
from test_lossless import prompts
from test_rollback import assert_same_caches

MAX_TOKENS = 24


class OracleTree(Drafter):
    """Trees of the given shape whose nodes are random tokens, except that at each depth the reference token sits
    at a random node below the previous depth's (with probability 0.8, else the right path ends): acceptances of
    first and later siblings at every depth, and rejections."""
    name = "oracle-tree"

    def __init__(self, references: dict[tuple, list[int]], vocab: int, seed: int = 0):
        self.references, self.vocab, self.rng = references, vocab, random.Random(seed)

    def propose(self, seqs, ks):
        raise AssertionError("tree rounds draft with propose_tree")

    def propose_tree(self, seqs, shapes):
        out = []
        for seq, shape in zip(seqs, shapes):
            ref, done = self.references[tuple(seq.tokens[:seq.n_prompt])], len(seq.generated)
            nodes, frontier, right = [], [-1], -1
            for d, width in enumerate(shape):
                new = []
                for _ in range(width):
                    parent = frontier[self.rng.randrange(len(frontier))]
                    nodes.append(Node(self.rng.randrange(self.vocab), parent, d + 1, -len(nodes)))
                    new.append(len(nodes) - 1)
                below = [n for n in new if nodes[n].parent == right]
                if right is not None and done + d < len(ref) and self.rng.random() < 0.8:
                    pick = self.rng.choice(below) if below else self.rng.choice(new)
                    nodes[pick].token, nodes[pick].parent, right = ref[done + d], right, pick
                else:
                    right = None
                frontier = new
            for i, n in enumerate(nodes):
                if n.parent >= 0:
                    nodes[n.parent].children.append(i)
            tokens, parents = depth_first(nodes)
            out.append(Draft(tokens, parents=parents))
        return out


@pytest.fixture(scope="module", params=["dense", "moe"])
def llm(request, ckpt_factory):
    return mtpx.LLM(ckpt_factory(moe=request.param == "moe"))


def decode(llm, drafter, prompt, policy, n=MAX_TOKENS, **sampling):
    seq = llm.engine.new_sequence(prompt, n, SamplingParams(**sampling), ignore_eos=True)
    prefill(llm.model, drafter, seq)
    while not seq.finished:
        decode_round(llm.model, drafter, policy, [seq])
    return seq


def test_verify_layout_puts_every_row_where_a_decode_of_its_path_would():
    #        row 0
    #       /     \
    #     1         4          rows in depth-first order
    #    / \        |
    #   2   3       5 (6: padding, a sibling of 5)
    parents = pad_parents([-1, 0, 1, 1, 0, 4], 7)
    rows = verify_rows(parents, 100)
    assert parents[-1] == 4 and rows.positions == rows.writes == (100, 101, 102, 102, 101, 102, 102)
    assert rows.keys[3] == (100, 101, 102) and rows.prefix == 100 and rows.in_place and rows.end == 103
    assert rows.segments == [(0, 3), (3, 4), (4, 6), (6, 7)]
    # conv windows (kernel 4): columns 0..2 hold the state's inputs, column 3 + t row t's
    windows = rows.windows(4)
    assert windows[0] == [0, 1, 2, 3] and windows[2] == [2, 3, 4, 5] and windows[3] == [2, 3, 4, 6]
    assert windows[5] == [2, 3, 7, 8]
    nodes = [Node(10, -1, 1, -0.1), Node(11, -1, 1, -2.0), Node(12, 0, 2, -0.5), Node(13, 0, 2, -0.3)]
    nodes[0].children = [2, 3]
    assert depth_first(nodes) == ([10, 13, 12, 11], [0, 1, 1, 0])  # likeliest first at each level


def test_greedy_trees_are_plain_decoding(llm):
    """MTP trees of several shapes, fixed and adaptive, and oracle trees (deep accepted paths through later
    siblings), one sequence and batched: every token plain decoding's."""
    batch = prompts(4, seed=31)
    refs = {tuple(p): llm.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none").token_ids
            for p in batch}
    for i, p in enumerate(batch):
        for tree in ("3,2,1", 2, "1,3,1"):
            out = llm.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="mtp", spec_draft_tree=tree,
                               spec_draft_policy="fixed" if i % 2 else "adaptive")
            assert out.token_ids == refs[tuple(p)], (i, tree)
        oracle = OracleTree(refs, llm.config.vocab_size, seed=i)
        seq = decode(llm, oracle, p, DraftPolicy(3, 0, adaptive=False, tree=(3, 2, 2)))
        assert seq.generated == refs[tuple(p)]
        assert seq.stats.accepted_tokens >= MAX_TOKENS // 3
    # batched: trees of every sequence in one verify pass (padded), drafted by the grouped MTP drafter
    spec = SpecConfig("mtp", spec_draft_tree=(2, 2), spec_draft_policy="fixed")
    drafter, policy = llm.engine.drafter(spec, batched=True), llm.engine.new_policy(spec)
    seqs = []
    for p in batch:
        seqs.append(llm.engine.new_sequence(p, MAX_TOKENS, SamplingParams(), ignore_eos=True))
        prefill(llm.model, drafter, seqs[-1])
    while any(not s.finished for s in seqs):
        decode_round(llm.model, drafter, policy, [s for s in seqs if not s.finished])
    assert [s.generated for s in seqs] == [refs[tuple(p)] for p in batch]


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
                                       dict(repetition_penalty=1.1, dry_multiplier=0.8, dry_allowed_length=1)],
                         ids=["counting", "with-dry"])
def test_penalties_follow_each_rows_path(dense_ckpt, penalties):
    """Each row is penalised for the drafts on its own path, not its siblings'."""
    llm = mtpx.LLM(dense_ckpt)
    for i, p in enumerate(prompts(3, seed=32)):
        ref = llm.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none", **penalties).token_ids
        seq = decode(llm, OracleTree({tuple(p): ref}, llm.config.vocab_size, seed=i), p,
                     DraftPolicy(3, 0, adaptive=False, tree=(3, 3, 2)), **penalties)
        assert seq.generated == ref and seq.stats.accepted_tokens > 0
        out = llm.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="mtp", spec_draft_tree="2,2",
                           spec_draft_policy="fixed", **penalties)
        assert out.token_ids == ref


def test_eos_and_stop_strings_inside_an_accepted_path_end_where_plain_decoding_ends(dense_ckpt):
    llm = mtpx.LLM(dense_ckpt)
    for i, p in enumerate(prompts(4, seed=37)):
        ref = llm.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none")
        llm.engine.eos = {ref.token_ids[6 + i]}
        llm.engine.drafter = lambda spec, batched=False: OracleTree({tuple(p): ref.token_ids}, llm.config.vocab_size,
                                                                    seed=i)
        try:
            plain = llm.generate(p, max_tokens=MAX_TOKENS, spec_type="none")
            out = llm.generate(p, max_tokens=MAX_TOKENS, spec_type="mtp", spec_draft_tree="3,2,2",
                               spec_draft_policy="fixed")
            assert (out.token_ids, out.text, out.finish_reason) == (plain.token_ids, plain.text, "stop")
            stop = ref.text[len(llm.tokenizer.decode(ref.token_ids[:9])):][1:4]
            if stop.strip():
                plain = llm.generate(p, max_tokens=MAX_TOKENS, spec_type="none", ignore_eos=True, stop=[stop])
                out = llm.generate(p, max_tokens=MAX_TOKENS, spec_type="mtp", spec_draft_tree="3,2,2",
                                   spec_draft_policy="fixed", ignore_eos=True, stop=[stop])
                assert (out.token_ids, out.text) == (plain.token_ids, plain.text)
        finally:
            llm.engine.eos = set(llm.config.eos_token_id)
            del llm.engine.drafter


def test_caches_after_tree_rounds_equal_plain_decoding(llm):
    """The main model's caches after tree rounds (K/V of the accepted nodes moved into place, the Gated DeltaNet
    states of each accepted path's last node) equal plain decoding's bit for bit, and the MTP layer's cache holds
    what chain drafting's holds: the accepted pairs only."""
    for i, p in enumerate(prompts(3, seed=33)):
        plain = decode(llm, None, p, None, n=30)
        oracle = decode(llm, OracleTree({tuple(p): plain.generated}, llm.config.vocab_size, seed=i), p,
                        DraftPolicy(3, 0, adaptive=False, tree=(2, 3, 2)), n=30)
        assert oracle.generated == plain.generated
        assert oracle.stats.accepted_tokens < oracle.stats.drafted_by_position[0] + 30  # rejections happened
        assert_same_caches(oracle.state, plain.state)
        tree = decode(llm, MTPDrafter(llm.model, tree_nodes=6), p, DraftPolicy(3, 0, adaptive=False, tree=(3, 2, 1)),
                      n=30)
        chain = decode(llm, MTPDrafter(llm.model), p, DraftPolicy(3, 0, adaptive=False), n=30)
        assert tree.generated == chain.generated == plain.generated
        assert_same_caches(tree.state, plain.state)
        a, b = tree.draft, chain.draft
        if a.committed == b.committed:  # the same accepted pairs seen (where both drafted last at the same spot)
            for layer in a.state.kv:
                for x, y in zip(a.state.kv[layer], b.state.kv[layer]):
                    assert torch.equal(x[:, :a.committed], y[:, :a.committed])


def test_stats_count_nodes_and_depths(dense_ckpt):
    """A tree round counts its nodes as drafted tokens, its depths as draft positions."""
    llm = mtpx.LLM(dense_ckpt)
    seq = decode(llm, MTPDrafter(llm.model, tree_nodes=6), [5, 6, 7], DraftPolicy(3, 0, False, tree=(3, 2, 1)), n=12)
    s = seq.stats
    assert s.drafted_by_position[0] == s.drafts and len(s.drafted_by_position) == 3
    # a round holds 3, 3 + 2 or 3 + 2 + 1 nodes, as its room allows: 2-3 per depth
    assert 2 * sum(s.drafted_by_position) <= s.drafted_tokens <= 3 * sum(s.drafted_by_position)
    assert s.by_drafter["mtp"].drafted_tokens == s.drafted_tokens


BAD_TREES = [("", "empty"), ("3,-1", "at least 1 branch"), ([], "empty"), ("0", "at least 1 branch"),
             ("40,30", "70 nodes is wider"), ("x,y", "number of branches"), (9, "81 nodes is wider")]


@pytest.mark.parametrize("tree,message", BAD_TREES)
def test_bad_shapes_name_the_field_and_the_flag(tree, message):
    with pytest.raises(FieldError, match=message) as e:
        SpecConfig("mtp", spec_draft_n_max=9, spec_draft_tree=tree)
    assert e.value.field == "spec_draft_tree"
    with pytest.raises(FieldError, match=message) as e:
        spec_from_json({"spec_type": "mtp", "spec_draft_n_max": 9, "spec_draft_tree": tree})
    assert e.value.field == "spec_draft_tree"
    if isinstance(tree, list):
        return  # no spelling on the command line
    p = argparse.ArgumentParser()
    add_spec_arguments(p)
    with pytest.raises(FieldError, match=f"^--spec-draft-tree: .*{message}"):
        spec_from_args(p.parse_args(["--spec-draft-n-max", "9", "--spec-draft-tree", str(tree)]), has_mtp=True)


def test_shapes_from_every_source():
    p = argparse.ArgumentParser()
    add_spec_arguments(p)
    assert spec_from_args(p.parse_args(["--spec-draft-tree", "3,2,1"]), has_mtp=True).spec_draft_tree == (3, 2, 1)
    assert spec_from_args(p.parse_args(["--spec-draft-tree", "2"]), has_mtp=True).spec_draft_tree == (2, 2, 2)
    assert SpecConfig("mtp", spec_draft_n_max=2, spec_draft_tree=4).spec_draft_tree == (4, 4)
    spec = spec_from_json({"spec_type": "mtp", "spec_draft_tree": [3, 1]})
    assert spec.spec_draft_tree == (3, 1) and spec.to_json()["spec_draft_tree"] == [3, 1]
    assert spec_from_json(spec.to_json()) == spec
    with pytest.raises(FieldError, match="spec_type must be mtp") as e:
        SpecConfig("ngram", spec_draft_tree=2)
    assert e.value.field == "spec_draft_tree"


def test_trees_need_a_family_and_passes_that_lay_them_out(dense_ckpt, family_factory):
    llm = mtpx.LLM(dense_ckpt)
    llm.engine.max_drafts = 7  # as with static step passes (CUDA graphs)
    try:
        with pytest.raises(FieldError, match="static step passes") as e:
            llm.generate([1, 2, 3], max_tokens=2, spec_type="mtp", spec_draft_tree=2)
        assert e.value.field == "spec_draft_tree"
    finally:
        llm.engine.max_drafts = None
    glm = mtpx.LLM(family_factory("glm"))
    with pytest.raises(FieldError, match="Qwen3.5 family"):
        glm.generate([1, 2, 3], max_tokens=2, spec_type="mtp", spec_draft_tree=2)
    nxt = mtpx.LLM(family_factory("qwen3_next"))  # runs on the Qwen3.5 family's code: trees too
    p = prompts(1, seed=35)[0]
    assert nxt.generate(p, max_tokens=12, spec_type="mtp", spec_draft_tree="2,2").token_ids == \
        nxt.generate(p, max_tokens=12, spec_type="none").token_ids


def test_sampled_trees_and_logprobs(dense_ckpt):
    """At T > 0 a tree round accepts by multi-draft rejection (distribution: test_tree_distribution.py); greedy
    logprobs of tree rounds are plain decoding's."""
    llm = mtpx.LLM(dense_ckpt)
    p = prompts(1, seed=34)[0]
    out = llm.generate(p, max_tokens=16, temperature=0.8, seed=3, spec_type="mtp", spec_draft_tree="3,2")
    assert len(out.token_ids) == 16
    plain = llm.generate(p, max_tokens=16, spec_type="none", logprobs=3)
    tree = llm.generate(p, max_tokens=16, spec_type="mtp", spec_draft_tree="2,2", spec_draft_policy="fixed",
                        logprobs=3)
    assert tree.token_ids == plain.token_ids and tree.logprobs == plain.logprobs


def test_a_shape_decided_elsewhere_drives_the_round(dense_ckpt):
    """Under tensor parallel, rank 0's policy decision reaches the other ranks as a ChosenK: a tree shape is one
    too, and whatever the round reads from the policy comes from it."""
    from mtpx.parallel.mirror import ChosenK
    llm = mtpx.LLM(dense_ckpt)
    p = prompts(1, seed=36)[0]
    ref = llm.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, spec_type="none").token_ids
    chosen = ChosenK((3, 2), 2, DraftPolicy(2, 0, True, tree=(3, 2)))
    seq = decode(llm, MTPDrafter(llm.model, tree_nodes=5), p, chosen)
    assert seq.generated == ref
    assert chosen.policy.tree_tried[0] > 0 and seq.stats.drafted_tokens > 2 * seq.stats.drafts
