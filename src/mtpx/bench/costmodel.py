"""Cost model of speculative decoding on this model and machine, measured with the engine's own step path.

- verify cost: a step-mode forward of r = k + 1 rows (plus lm_head) relative to one plain decode step (r = 1);
- draft cost c: one MTP step (MTP layer + lm_head, one row) relative to one plain step; likewise a draft model
  step; where greedy drafts run as one kernel call (CausalLM.mtp_greedy_drafts), also that call's cost per draft,
  which the predictions for greedy MTP modes use (the engine drafts them that way);
- the MTP layer's pass over a prompt relative to the main model's prefill of it.

Predictions (REFERENCE §4): with i.i.d. acceptance α and k drafts a round yields E = (1 − α^(k+1)) / (1 − α) tokens
and costs 1 + k·c plain steps, so speedup ≈ E / (1 + k·c). The refined prediction uses the measured mean acceptance
length for E and the measured verify cost of k + 1 rows instead of 1.
"""
from __future__ import annotations

import statistics
import time

import torch

from mtpx.models.interface import CausalLM

CHAIN_DRAFTS = 3  # drafts per call when timing the one-call greedy draft chain


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def measure_costs(model: CausalLM, context: int = 128, reps: int = 15, max_rows: int = 5,
                  draft_model: CausalLM | None = None, seed: int = 0, prefills: int | None = None) -> dict:
    """Median times of step forwards after a `context`-token prefill (interleaved over row counts); `prefills`:
    how many prefills of the context to time (default max(3, reps // 3); 0 at long contexts, where one costs
    more than all the steps: the prefill figures are then left out)."""
    prefills = max(3, reps // 3) if prefills is None else prefills
    device = model.lm_head.weight.device
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    ids = torch.randint(0, vocab, (1, context + 1), generator=g).to(device)
    prompt, nxt = ids[:, :context], ids[:, 1:context + 1]
    state = model.new_state(context + max_rows + 8)
    hidden = model(prompt, [state], "prefill")
    length = state.length
    row_tokens = {r: torch.randint(0, vocab, (1, r), generator=g).to(device) for r in range(1, max_rows + 1)}

    def verify(r):
        state.mark()
        h = model(row_tokens[r], [state], "step")
        model.logits(h, step=True).float()
        state.rollback(length)

    mtp_state = None
    if model.mtp is not None:
        mtp_state = model.new_mtp_state(context + max_rows + 8)
        model.mtp_forward(hidden, nxt, [mtp_state], "prefill")
        mtp_len = mtp_state.length
        h_last, t_last = hidden[:, -1:], nxt[:, -1:]

        def mtp_step():
            mtp_state.mark()
            x = model.mtp_forward(h_last, t_last, [mtp_state], "step")
            model.logits(x[:, -1], step=True).float()
            mtp_state.rollback(mtp_len)

        def mtp_chain():  # greedy drafting as the engine runs it for one sequence: k drafts in one kernel call
            mtp_state.mark()
            drafts = model.mtp_greedy_drafts(h_last[0], t_last[0], mtp_state, CHAIN_DRAFTS)
            mtp_state.rollback(mtp_len)
            return drafts

        def mtp_prefill():
            s = model.new_mtp_state(context + 8)
            model.mtp_forward(hidden, nxt, [s], "prefill")

    def main_prefill():
        s = model.new_state(context + 8)
        h = model(prompt, [s], "prefill")
        model.logits(h[0, -1]).float()

    dm_state = None
    if draft_model is not None:
        dm_state = draft_model.new_state(context + 8)
        draft_model(prompt, [dm_state], "prefill")
        dm_len, dm_tok = dm_state.length, row_tokens[1]

        def dm_step():
            dm_state.mark()
            h = draft_model(dm_tok, [dm_state], "step")
            draft_model.logits(h, step=True).float()
            dm_state.rollback(dm_len)

    times: dict[str, list[float]] = {f"verify_{r}": [] for r in range(1, max_rows + 1)}
    chain = mtp_state is not None and mtp_chain() is not None
    for _ in range(2):  # warm-up
        for r in range(1, max_rows + 1):
            verify(r)
        if mtp_state is not None:
            mtp_step()
        if chain:
            mtp_chain()
        if dm_state is not None:
            dm_step()
    for i in range(reps):
        for r in range(1, max_rows + 1):
            times[f"verify_{r}"].append(_timed(lambda: verify(r), device))
        if mtp_state is not None:
            times.setdefault("mtp_step", []).append(_timed(mtp_step, device))
        if chain:
            times.setdefault("mtp_chain", []).append(_timed(mtp_chain, device))
        if dm_state is not None:
            times.setdefault("draft_model_step", []).append(_timed(dm_step, device))
        if i < prefills:
            times.setdefault("prefill", []).append(_timed(main_prefill, device))
            if mtp_state is not None:
                times.setdefault("mtp_prefill", []).append(_timed(mtp_prefill, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    step = med["verify_1"]
    out = {
        "context_tokens": context, "repetitions": reps,
        "plain_step_s": step,
        "verify_s": {r: med[f"verify_{r}"] for r in range(1, max_rows + 1)},
        "verify_rel": {r - 1: med[f"verify_{r}"] / step for r in range(1, max_rows + 1)},  # key: k drafts
    }
    if "prefill" in med:
        out.update(prefill_s=med["prefill"], prefill_tokens_per_s=context / med["prefill"])
    if "mtp_step" in med:
        out.update(mtp_step_s=med["mtp_step"], c_mtp=med["mtp_step"] / step)
    if "mtp_prefill" in med:
        out.update(mtp_prefill_s=med["mtp_prefill"], mtp_prefill_rel=med["mtp_prefill"] / med["prefill"])
    if "mtp_chain" in med:
        per_draft = med["mtp_chain"] / CHAIN_DRAFTS
        out.update(mtp_chain_draft_s=per_draft, c_mtp_chain=per_draft / step)
    if "draft_model_step" in med:
        out.update(draft_model_step_s=med["draft_model_step"], c_draft_model=med["draft_model_step"] / step)
    return out


def expected_tokens(alpha: float, k: int) -> float:
    """REFERENCE §4: tokens per round with i.i.d. acceptance α and k drafts."""
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def predict(alpha: float, k: int, c: float) -> float:
    """REFERENCE §4: speedup ≈ E / (1 + k·c)."""
    return expected_tokens(alpha, k) / (1 + k * c)


def predict_refined(mean_acceptance_length: float, k: int, c: float, verify_rel: float) -> float:
    """Measured tokens per round over measured cost per round (verify of k + 1 rows + k draft steps)."""
    return mean_acceptance_length / (verify_rel + k * c)


def add_predictions(records: list[dict], costs: dict) -> None:
    """Predicted speedups beside the measured ones, for fixed-k MTP and draft-model modes (drafting cost known)."""
    for rec in records:
        c = {"mtp": costs.get("c_mtp"), "draft": costs.get("c_draft_model")}.get(rec["spec_type"])
        if rec["spec_type"] == "mtp" and rec["temperature"] == 0 and costs.get("c_mtp_chain") is not None:
            c = costs["c_mtp_chain"]  # greedy MTP drafts run as one call per round (CausalLM.mtp_greedy_drafts)
        if rec["policy"] != "fixed" or c is None or not rec["drafts"]:
            rec["predicted_speedup"] = rec["predicted_speedup_refined"] = None
            continue
        k = rec["k"]
        vrel = costs["verify_rel"].get(k)
        rec["cost_c"] = c
        rec["verify_rel"] = vrel
        rec["predicted_speedup"] = predict(rec["acceptance_rate"], k, c)
        rec["predicted_speedup_refined"] = (predict_refined(rec["mean_acceptance_length"], k, c, vrel)
                                            if vrel is not None else None)
