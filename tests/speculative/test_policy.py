"""The adaptive draft-length policy against simulated round costs: it finds the k that pays, never drafts where the
weight reads alone rule drafting out, and samples a cost only once a measurement run is steady."""
from mtpx.speculative.policy import MEASURE_ROUNDS, DraftPolicy


def simulate(policy: DraftPolicy, batch: int, cost, rounds: int = 400) -> list[int]:
    """Run the policy for `rounds` rounds, every draft accepted; cost(k, position in the current run of equal k)
    -> seconds of the round."""
    chosen, run = [], 0
    for _ in range(rounds):
        k = policy.next_k(batch)
        run = run + 1 if chosen and chosen[-1] == k else 1
        policy.observe(batch, [k] * batch, [k] * batch, 0.0, cost(k, run))
        chosen.append(k)
    return chosen


def test_drafts_when_rounds_are_cheap_and_not_when_they_are_dear():
    cheap = DraftPolicy(3, 0, True)
    chosen = simulate(cheap, 1, lambda k, run: 1.0 + 0.1 * k)
    assert chosen[-100:].count(3) > 90
    dear = DraftPolicy(3, 0, True)
    chosen = simulate(dear, 1, lambda k, run: 1.0 + 1.5 * k)
    assert chosen[-100:].count(0) > 90


def test_first_rounds_of_a_measurement_run_are_not_sampled():
    """A drafting round right after plain ones pays catch-up and cold caches; only the steady cost counts."""
    policy = DraftPolicy(1, 0, True)
    chosen = simulate(policy, 1, lambda k, run: 1.0 + (0.2 if run >= MEASURE_ROUNDS else 5.0) * k)
    assert abs(policy.ratio[(1, 1)] - 1.2) < 1e-9
    assert chosen[-100:].count(1) > 90


def test_never_drafts_where_blocked_matmuls_read_the_weights_again():
    """With 8-row blocks, 8 sequences x (k + 1) rows read the weights k + 1 times: no k can win, none is measured,
    even if the simulated rounds (wrongly) cost nothing extra."""
    policy = DraftPolicy(3, 0, True, row_block=8)
    chosen = simulate(policy, 8, lambda k, run: 1.0)
    assert set(chosen) == {0}
    assert policy.weight_reads(8, 1) == 2 and policy.weight_reads(2, 3) == 1 and policy.weight_reads(4, 2) == 2
    # at one stream the same policy drafts when it pays
    assert simulate(DraftPolicy(3, 0, True, row_block=8), 1, lambda k, run: 1.0 + 0.1 * k)[-100:].count(3) > 90


def test_batch_sizes_moving_up_and_down_do_not_reset_the_exploration_backoff():
    """In a server the batch size changes all the time; each batch size keeps its own exploration interval, so a
    settled choice is re-measured rarely (here: plain decoding at batch 4, drafting at batch 1)."""
    policy = DraftPolicy(3, 0, True, row_block=8)
    cost = lambda batch, k: 1.0 + (0.1 if batch == 1 else 1.5) * k
    chosen = {1: [], 4: []}
    for round_ in range(6000):
        batch = 1 if round_ % 250 < 5 else 4  # waves of 4 requests, a few rounds alone between them
        k = policy.next_k(batch)
        chosen[batch].append(k)
        policy.observe(batch, [k] * batch, [k] * batch, 0.0, cost(batch, k))
    late = chosen[4][-1000:]
    assert late.count(0) >= 980  # explorations only every EXPLORE_MAX rounds of batch 4 once settled
    assert chosen[1][-100:].count(3) >= 70


def test_a_measurement_run_stops_when_the_batch_size_changes():
    """A run of k = 1 started for 4 sequences must not go on when 8 are running: there 16 rows read the weights
    twice, and the run's rounds would not compare with each other anyway."""
    policy = DraftPolicy(1, 0, True, row_block=8)
    k = policy.next_k(4)
    while k == 0:  # reference rounds without drafts, until a measurement run of k = 1 starts
        policy.observe(4, [0] * 4, [0] * 4, 0.0, 1.0)
        k = policy.next_k(4)
    policy.observe(4, [1] * 4, [1] * 4, 0.0, 1.1)
    assert policy.repeat_left == MEASURE_ROUNDS - 1  # the run had more rounds to go
    assert policy.next_k(8) == 0  # four more requests arrived


def test_time_spent_on_other_work_between_rounds_is_not_a_rounds_cost():
    policy = DraftPolicy(1, 0, True)
    policy.observe(1, [0], [0], 0.0, 0.01, started=0.0, ended=0.01)
    policy.observe(1, [0], [0], 0.0, 0.01, started=0.02, ended=0.03)
    assert abs(policy.recent[-1][2] - 0.02) < 1e-9  # streaming gap of 10 ms counted
    policy.skip_gap()  # e.g. a prefill of 100 ms ran here
    policy.observe(1, [0], [0], 0.0, 0.01, started=0.13, ended=0.14)
    assert abs(policy.recent[-1][2] - 0.01) < 1e-9


def test_a_new_request_keeps_the_acceptance_at_half_weight_and_restarts_the_exploration_backoff():
    policy = DraftPolicy(3, 0, True)
    simulate(policy, 1, lambda k, run: 1.0 + 2.0 * k, rounds=600)  # drafting never pays: the backoff grows
    assert policy.explore[1][0] == 0 and policy.explore[1][1] > 16 and policy.tried[0] > 0
    tried, accepted = list(policy.tried), list(policy.accepted)
    policy.new_request()
    assert policy.explore[1][1:] == [16, 0]  # the new text's acceptance is tried soon
    assert policy.tried == [t / 2 for t in tried] and policy.accepted == [a / 2 for a in accepted]
    assert policy.last_end is None


def test_a_new_request_keeps_the_backoff_where_drafting_won():
    # its drafting rounds measure the new text's acceptance anyway; plain rounds would only re-measure the cost
    policy = DraftPolicy(3, 0, True)
    simulate(policy, 1, lambda k, run: 1.0 + 0.1 * k, rounds=600)
    entry = list(policy.explore[1])
    assert entry[0] == 3 and entry[1] > 16
    policy.new_request()
    assert policy.explore[1] == entry


def test_a_catch_up_on_the_prompt_is_paid_only_where_drafting_earns_it_back():
    """Drafting 2 tokens a round at 1.5x a plain round's time saves a quarter of a plain round a token: 10 plain
    rounds of catch-up pay off over more than 40 tokens; an unmeasured option and the exploration of the runner-up
    are held to the same test."""
    policy = DraftPolicy(1, 0, True)
    simulate(policy, 1, lambda k, run: 1.0 + 0.5 * k, rounds=300)  # every draft accepted: k = 1 wins
    assert policy.next_k(1, catch_up=100, remaining=30) == 1  # no catch-up timed yet: nothing to weigh
    policy.observe_catch_up((200, 20.0))  # 0.1 plain rounds a position
    assert policy.next_k(1, catch_up=100, remaining=30) == 0
    assert policy.next_k(1, catch_up=100, remaining=60) == 1
    assert policy.next_k(1, catch_up=0, remaining=30) == 1  # nothing to catch up on
    with_min = DraftPolicy(2, 1, True)  # n_min > 0: every round drafts, the catch-up is paid whatever k
    simulate(with_min, 1, lambda k, run: 1.0 + 0.5 * k, rounds=300)
    with_min.observe_catch_up((200, 20.0))
    assert with_min.next_k(1, catch_up=100, remaining=2) >= 1
    fresh = DraftPolicy(1, 0, True)  # k = 1 never measured: at best 1.6 tokens a round at no extra cost
    simulate(fresh, 1, lambda k, run: 1.0, rounds=1)  # a plain round to measure against
    fresh.observe_catch_up((200, 20.0))
    assert fresh.next_k(1, catch_up=100, remaining=20) == 0 and fresh.measure_tries == {}
    assert fresh.next_k(1, catch_up=100, remaining=40) == 1
    losing = DraftPolicy(1, 0, True)  # plain wins; after new_request the runner-up is re-measured within 16 rounds ...
    simulate(losing, 1, lambda k, run: 1.0 + 2.0 * k, rounds=300)
    losing.new_request()
    losing.observe_catch_up((200, 20.0))
    # ... but not where the catch-up costs more than MARGIN of the rest (10 of 50 plain rounds) ...
    assert {losing.next_k(1, catch_up=100, remaining=50) for _ in range(40)} == {0}
    assert 1 in [losing.next_k(1, catch_up=100, remaining=100) for _ in range(40)]  # ... where it costs less, it is


def simulate_tree(policy: DraftPolicy, chain_rate: float, tree_rate: float, cost, rounds: int = 600) -> list:
    """Rounds whose drafts are accepted position by position with chain_rate (chains) or tree_rate (a tree's
    depths); cost(nodes) -> seconds of the round."""
    import random
    from mtpx.speculative.policy import nodes
    rng, chosen = random.Random(0), []
    for _ in range(rounds):
        k = policy.next_k(1)
        tree = k if isinstance(k, tuple) else None
        depth = len(k) if tree else k
        n, first = 0, 0  # the tree's first children are the chain's drafts: accepted at chain_rate
        while n < depth:
            u = rng.random()
            if u >= (tree_rate if tree else chain_rate):
                break
            first += first == n and u < chain_rate
            n += 1
        policy.observe(1, [depth], [n], 0.0, cost(nodes(k)), tree=tree,
                       chains=([depth], [first]) if tree else None)
        chosen.append(k)
    return chosen


def test_trees_are_chosen_where_their_acceptance_pays_for_their_nodes():
    """A tree (and its cuts) is one more option: chosen where its measured per-depth acceptance outweighs the
    measured cost of its nodes, not where nodes are dear, and never where the chain does better."""
    cheap = simulate_tree(DraftPolicy(3, 0, True, tree=(3, 2, 2)), 0.5, 0.9, lambda n: 1.0 + 0.05 * n)
    assert cheap[-200:].count((3, 2, 2)) > 170
    assert {(3,), (3, 2)} <= set(cheap)  # its cuts were measured too
    dear = simulate_tree(DraftPolicy(3, 0, True, tree=(3, 2, 2)), 0.5, 0.9, lambda n: 1.0 + 0.4 * n)
    assert not any(isinstance(k, tuple) for k in dear[-200:])
    useless = simulate_tree(DraftPolicy(3, 0, True, tree=(3, 2, 2)), 0.8, 0.8, lambda n: 1.0 + 0.05 * n)
    assert useless[-200:].count(3) > 170
    fixed = DraftPolicy(3, 0, False, tree=(3, 2, 2))
    assert fixed.next_k(1) == (3, 2, 2) and DraftPolicy(3, 0, False, tree=(1, 1)).next_k(1) == 3  # (1, 1): a chain
