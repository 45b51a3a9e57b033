"""Logits processing, sampling, and the acceptance rules of speculative decoding.

The target distribution p is built by exactly the same code in plain and speculative decoding (temperature, then
top-k, top-p, min-p), so speculative sampling is distributed exactly like plain sampling (Leviathan et al. 2023).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from mtpx import kernels
from mtpx.engine.params import DRY_BREAKERS, SamplingParams  # noqa: F401 (re-exported: mtpx.sampling.SamplingParams)


DRY_MAX_EXPONENT = 40  # 1.75^40 = 5e9 already rules a token out; longer runs count as this long (finite in fp32)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, tokens: list[int], n_prompt: int,
                    drafts: list[int] = (), history: "PenaltyHistory | None" = None) -> torch.Tensor:
    """Penalised copy of logits [R, V] for rows that follow `tokens` (prompt of n_prompt, then generated ones):
    row j follows `tokens + drafts[:j]` — in a verify pass, row j only counts once drafts[:j] are accepted, so each
    row sees exactly the history plain decoding would, and speculation stays lossless. `history`: the sequence's
    PenaltyHistory, kept up to date instead of rebuilt. Without penalties: logits."""
    if not params.penalized:
        return logits
    out = (_count_penalties(logits, params, tokens, n_prompt, drafts, history) if params.counts_tokens
           else logits.float().clone())
    if params.dry:
        rows, cols, amounts = [], [], []
        occurrences = history.occurrences.of(tokens) if history is not None else None
        for j in range(out.shape[0]):
            context = _Extended(tokens, list(drafts[:j])) if occurrences is not None else tokens + list(drafts[:j])
            for token, amount in dry_penalties(context, params, occurrences).items():
                rows.append(j), cols.append(token), amounts.append(-amount)
        if rows and out.device.type == "cpu":  # a few element writes: through numpy, without torch's per-op cost
            view = out.numpy()
            for j, t, amount in zip(rows, cols, amounts):
                view[j, t] += np.float32(amount)  # float32 arithmetic, as index_put_ does
        elif rows:
            index = (torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device))
            out.index_put_(index, torch.tensor(amounts, device=out.device), accumulate=True)
    return out


def _count_penalties(logits: torch.Tensor, params: SamplingParams, tokens: list[int], n_prompt: int,
                     drafts: list[int], history: "PenaltyHistory | None") -> torch.Tensor:
    """The repetition, frequency and presence penalties of apply_penalties (a new fp32 tensor)."""
    rows, vocab = logits.shape
    device = logits.device
    history_counts, history_seen = (history.of(tokens, n_prompt, vocab, device) if history is not None
                                    else penalty_history(tokens, n_prompt, vocab, device))
    drafted = torch.tensor(list(drafts[:rows - 1]), dtype=torch.long, device=device)
    fused = kernels.penalize_rows(logits, history_counts, history_seen, drafted, params.repetition_penalty,
                                  params.frequency_penalty, params.presence_penalty)
    if fused is not None:
        return fused
    # only the ids of the history and the drafts change: penalise those columns and copy the rest (fewer, smaller
    # ops than over the whole vocabulary)
    ids = torch.unique(torch.cat([history_seen.nonzero().flatten(), drafted]))
    counts = history_counts[ids].expand(rows, -1)
    seen = history_seen[ids].expand(rows, -1)
    if len(drafted):  # row j also counts drafts[:j]
        after = (torch.arange(rows, device=device)[:, None] > torch.arange(len(drafted), device=device)[None, :])
        extra = torch.zeros(rows, len(ids), device=device).index_add_(1, torch.searchsorted(ids, drafted),
                                                                        after.float())
        counts, seen = counts + extra, seen | (extra > 0)
    out = logits.float().clone()
    out[:, ids] = penalize(out[:, ids], params, counts, seen)
    return out


def dry_penalties(context: Sequence[int], params: SamplingParams,
                  occurrences: "TokenOccurrences | None" = None) -> dict[int, float]:
    """DRY: what each token id loses from its logit as the token after `context`. For every earlier occurrence of
    the context's last token, the run is how many tokens before it match the context's end (no sequence breaker
    inside), and the token that followed it is penalised by multiplier · base^(run - allowed_length) when the run
    is at least allowed_length long; the longest run per token counts. `occurrences`: an index of a prefix of
    `context`, so that only the rest is scanned for the last token."""
    n = len(context)
    start = 0 if params.dry_penalty_last_n < 0 else max(n - params.dry_penalty_last_n, 0)
    breakers = params.dry_breaker_ids
    if n - start < 2 or context[n - 1] in breakers:
        return {}
    end = n - 1
    last = context[end]
    scan_from = start
    earlier: list[int] = []
    if occurrences is not None:
        earlier = occurrences.between(last, start, end)
        scan_from = max(start, occurrences.done)
    earlier += [i for i in range(scan_from, end) if context[i] == last]
    longest_counted = params.dry_allowed_length + DRY_MAX_EXPONENT  # bounds the work in a long loop
    runs: dict[int, int] = {}
    for i in earlier:
        following = context[i + 1]
        if following in breakers:
            continue
        run = 1
        while i - run >= start and run < longest_counted and context[i - run] == context[end - run] \
                and context[i - run] not in breakers:
            run += 1
        runs[following] = max(run, runs.get(following, 0))
    allowed = params.dry_allowed_length
    return {t: params.dry_multiplier * params.dry_base ** min(run - allowed, DRY_MAX_EXPONENT)
            for t, run in runs.items() if run >= allowed}


class TokenOccurrences:
    """Where each token id occurs in one growing sequence, indexed as it grows (as PenaltyHistory counts): DRY finds
    the earlier occurrences of the last token without scanning the whole context for every verify row (at 32k
    tokens the scan cost ~1 ms a round)."""

    def __init__(self):
        self.where: dict[int, list[int]] = {}
        self.done = 0  # tokens indexed so far

    def of(self, tokens: list[int]) -> "TokenOccurrences":
        if len(tokens) < self.done:  # not the same growing sequence
            self.where, self.done = {}, 0
        for i in range(self.done, len(tokens)):
            self.where.setdefault(tokens[i], []).append(i)
        self.done = len(tokens)
        return self

    def between(self, token: int, lo: int, hi: int) -> list[int]:
        """Positions p of token with lo <= p < hi."""
        found = self.where.get(token, [])
        return found[bisect.bisect_left(found, lo):bisect.bisect_left(found, hi)]


class _Extended(Sequence):
    """tokens + extra without copying tokens: a verify row's context, the sequence and then some drafts."""

    def __init__(self, tokens: list[int], extra: list[int]):
        self.tokens, self.extra, self.n = tokens, extra, len(tokens)

    def __len__(self) -> int:
        return self.n + len(self.extra)

    def __getitem__(self, i: int) -> int:
        return self.tokens[i] if i < self.n else self.extra[i - self.n]


def penalty_history(tokens: list[int], n_prompt: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """What the penalties of the next token depend on: how often each id was generated (float [V]; frequency and
    presence penalties count generated tokens only, as vLLM's do) and whether it was seen at all (bool [V]: generated
    or in the prompt; the repetition penalty's set)."""
    return PenaltyHistory().of(tokens, n_prompt, vocab, device)


class PenaltyHistory:
    """penalty_history of one sequence, kept up to date: a sequence's tokens are only ever appended, so each call
    counts just the tokens added since the last one. (Rebuilt from the whole history twice a round, for the draft
    chain and for verification, it cost ~20 % of a demo step.) Callers must not modify the tensors it returns."""

    def __init__(self):
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.done = 0  # tokens counted so far
        self._views: tuple[np.ndarray, np.ndarray] | None = None
        self.occurrences = TokenOccurrences()  # DRY's index, kept beside the counts

    def of(self, tokens: list[int], n_prompt: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None or len(tokens) < self.done:  # first use, or not the same growing sequence
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.done = 0
            # a round's few new tokens are element writes through numpy views of the same memory (~1 us), where
            # three small torch ops cost ~70 us, ~7 % of a demo step
            self._views = (self.seen.numpy(), self.counts.numpy()) if self.counts.device.type == "cpu" else None
        if self._views is not None and 0 < len(tokens) - self.done <= 16:
            seen, counts = self._views
            for i in range(self.done, len(tokens)):
                seen[tokens[i]] = True
                if i >= n_prompt:
                    counts[tokens[i]] += 1
            self.done = len(tokens)
        elif len(tokens) > self.done:
            new = torch.tensor(tokens[self.done:], dtype=torch.long, device=device)
            self.seen[new] = True
            generated = new[max(n_prompt - self.done, 0):]
            if len(generated):
                self.counts.index_put_((generated,), torch.ones(len(generated), device=device), accumulate=True)
            self.done = len(tokens)
        return self.counts, self.seen


def penalize(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Logits (float32) after the repetition penalty (a seen id's positive logit divided by it, a negative one
    multiplied), then frequency and presence. The CPU kernels compute the same (kernels.h penalized_logit)."""
    out = logits.float().clone()
    if params.repetition_penalty != 1:
        r = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
    return out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities after temperature, top-k, top-p, min-p."""
    logits = logits.float() / max(params.temperature, 1e-5)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        top, ids = torch.topk(logits, min(params.top_k + 1, vocab), dim=-1)
        if params.top_k + 1 > vocab or bool((top[..., -1] < top[..., -2]).all()):
            # no tie at the k-th value: the rest of the work is on the k candidates only (sorted, largest first)
            # and the result is scattered back; on Qwen3.5's 248k ids this saves full-vocabulary passes
            probs = _after_top_k(top[..., :params.top_k], params)
            return torch.zeros_like(logits).scatter_(-1, ids[..., :params.top_k], probs)
        logits = logits.masked_fill(logits < top[..., params.top_k - 1:params.top_k], float("-inf"))  # ties kept
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _after_top_k(top: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """target_probs for the top-k logits [N, k] alone, sorted largest first: softmax, top-p, min-p, normalised."""
    probs = torch.softmax(top, dim=-1)
    if params.top_p < 1.0:
        probs = probs * _within_top_p(probs, params.top_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs[..., :1], 0.0)
    return probs / probs.sum(-1, keepdim=True)


TOP_P_FIRST = 256  # candidates top-p first looks at; 8x more each time they hold less than top_p of the mass


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [N, V] with all but the smallest prefix of each row's descending order reaching top_p set to 0. The
    prefix lies among the largest K ids once those hold top_p of the mass (every later id then has at least top_p
    before it), so only they are sorted, by topk: a full sort of Qwen3.5's 248k ids cost 10 ms a row on the CPU."""
    vocab = probs.shape[-1]
    k = min(TOP_P_FIRST, vocab)
    while True:
        top, order = probs.topk(k, dim=-1)  # sorted, largest first
        if k == vocab or bool((top.cumsum(-1)[..., -1] >= top_p).all()):
            break
        k = min(8 * k, vocab)
    return probs * torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, _within_top_p(top, top_p))


def _within_top_p(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """For probabilities sorted largest first: which belong to the smallest prefix reaching top_p, i.e. have less
    than top_p of the mass strictly before them (the top-p rule, for both of target_probs' paths)."""
    return sorted_probs.cumsum(-1) - sorted_probs < top_p


SAMPLE_BLOCK = 2048  # ids per block of the two-level inverse cumulative sum in `sample`


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token drawn from probs [V] (any scale): a uniform draw located in the cumulative sum, first among blocks
    of SAMPLE_BLOCK ids, then within the block, in float64 (exact enough for a 248k-id cumulative, and no id of
    probability 0 can hold the draw: its interval is empty). On the CPU torch.multinomial took 170 us for 8k ids and
    5 ms for Qwen3.5's 248k (it draws a random number per id); this one draw, one pass and two short sums."""
    p = probs.cpu().float()  # the generator is a CPU one
    pad = -len(p) % SAMPLE_BLOCK
    blocks = torch.nn.functional.pad(p, (0, pad)).reshape(-1, SAMPLE_BLOCK).sum(1, dtype=torch.float64).cumsum(0)
    u = torch.rand((1,), generator=gen, dtype=torch.float64) * blocks[-1]
    b = min(int(torch.searchsorted(blocks, u, right=True)), len(blocks) - 1)
    while b > 0 and blocks[b] <= blocks[b - 1]:  # u rounded up to the total: the last block that has mass
        b -= 1
    start = b * SAMPLE_BLOCK
    inner = p[start:start + SAMPLE_BLOCK].double().cumsum(0)
    i = min(int(torch.searchsorted(inner, u - (blocks[b - 1] if b else 0.0), right=True)), len(inner) - 1)
    while p[start + i] <= 0:  # rounding between the two sums put u past the block's last id with mass
        i -= 1
    return start + i


def choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Pick the next token from one row of logits, as plain decoding does."""
    if params.greedy:
        return kernels.argmax_rows(logits.reshape(1, -1))[0]
    return sample(target_probs(logits[None], params)[0], gen)


def accept(target_logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, params: SamplingParams,
           gen: torch.Generator | None, synthetic_rates: list[float] | None = None) -> tuple[int, int]:
    """Verify k drafts against target logits [k + 1, V].

    Returns (number of drafts accepted, the token emitted after them). Greedy: longest prefix matching the target's
    argmax. Sampling: accept d_i with probability min(1, p/q) and on rejection sample from max(0, p - q); a
    deterministic drafter (draft_probs None) is the one-hot q case: accept with p(d), else sample p without d.
    `synthetic_rates` (benchmarking only) replaces the rule by coin flips with the given per-position rates.
    """
    k = len(drafts)
    if synthetic_rates is not None:
        coin = gen if gen is not None else torch.Generator().manual_seed(0)
        n = 0
        while n < k and torch.rand((), generator=coin).item() < synthetic_rates[min(n, len(synthetic_rates) - 1)]:
            n += 1
        return n, choose(target_logits[n], params, gen)
    if params.greedy:
        best = kernels.argmax_rows(target_logits)
        n = 0
        while n < k and drafts[n] == best[n]:
            n += 1
        return n, best[n]
    # row by row, as plain decoding processes its one row: rows after a rejection are never processed
    def p(i: int) -> torch.Tensor:
        return target_probs(target_logits[i:i + 1], params)[0]
    for i, d in enumerate(drafts):
        p_i = p(i)
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if q_d > 0 and torch.rand((), generator=gen).item() < min(1.0, float(p_i[d]) / q_d):
            continue
        if draft_probs is None:
            residual = p_i.clone()
            residual[d] = 0.0
        else:
            residual = (p_i - draft_probs[i]).clamp_min(0.0)
        if residual.sum() <= 0:  # p == q (up to rounding): any sample from p is exact
            residual = p_i
        return i, sample(residual / residual.sum(), gen)
    return k, sample(p(k), gen)
