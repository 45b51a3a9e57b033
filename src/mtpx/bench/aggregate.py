"""From per-generation rows to one record per (mode, workload, temperature): throughput as total tokens over total
time per repeat (min / median / max over repeats), speedup over `none` measured in the same repeat, acceptance
summed over all generations."""
from __future__ import annotations

import statistics
from collections import defaultdict

from mtpx.bench.runner import Mode


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _spread(values: list[float], key: str) -> dict:
    if not values:
        return {key: 0.0, f"{key}_min": 0.0, f"{key}_max": 0.0, f"{key}_by_repeat": []}
    return {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values),
            f"{key}_by_repeat": values}


def per_repeat(rows: list[dict]) -> dict[int, dict]:
    """Totals of one group's rows for each repeat."""
    out: dict[int, dict] = {}
    by_rep: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_rep[r["repeat"]].append(r)
    for rep, rs in sorted(by_rep.items()):
        dec_tokens = sum(r["decode_tokens"] for r in rs)
        dec_s = sum(r["decode_s"] for r in rs)
        p_tokens = sum(r["prompt_tokens"] for r in rs)
        p_s = sum(r["prefill_s"] for r in rs)
        pd_s = p_s + sum(r["drafter_prefill_s"] for r in rs)
        out[rep] = {"decode_tokens_per_s": _ratio(dec_tokens, dec_s), "prefill_tokens_per_s": _ratio(p_tokens, p_s),
                    "prefill_with_drafter_tokens_per_s": _ratio(p_tokens, pd_s), "decode_s": dec_s,
                    "decode_tokens": dec_tokens}
    return out


def aggregate(rows: list[dict], modes: list[Mode], synthetic_rates: list[float] | None = None) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["workload"], r["temperature"], r["mode"])].append(r)
    mode_of = {m.name: m for m in modes}
    records = []
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    temps = list(dict.fromkeys(r["temperature"] for r in rows))
    for w in workloads:
        for t in temps:
            base = per_repeat(groups.get((w, t, "none"), []))
            for m in modes:
                rs = groups.get((w, t, m.name))
                if not rs:
                    continue
                reps = per_repeat(rs)
                speedups = [_ratio(reps[k]["decode_tokens_per_s"], base[k]["decode_tokens_per_s"])
                            for k in reps if k in base]
                prefill_ratio = [_ratio(reps[k]["prefill_tokens_per_s"], base[k]["prefill_tokens_per_s"])
                                 for k in reps if k in base]
                prefill_d_ratio = [_ratio(reps[k]["prefill_with_drafter_tokens_per_s"],
                                          base[k]["prefill_tokens_per_s"]) for k in reps if k in base]
                drafts = sum(r["drafts"] for r in rs)
                drafted = sum(r["drafted_tokens"] for r in rs)
                accepted = sum(r["accepted_tokens"] for r in rs)
                npos = max((len(r["acceptance_by_position"]) for r in rs), default=0)
                by_pos = []
                for j in range(npos):  # each generation's rate at position j, weighted by its number of drafts
                    num = sum(r["drafts"] * r["acceptance_by_position"][j] for r in rs
                              if len(r["acceptance_by_position"]) > j)
                    den = sum(r["drafts"] for r in rs if len(r["acceptance_by_position"]) > j)
                    by_pos.append(_ratio(num, den))
                dec_tokens = sum(r["decode_tokens"] for r in rs)
                wbytes = [r["decode_weight_bytes"] for r in rs if r.get("decode_weight_bytes") is not None]
                rec = {
                    "mode": m.name, "workload": w, "temperature": t, "spec_type": m.spec_type, "k": m.k,
                    "policy": m.policy, "synthetic": synthetic_rates is not None and m.speculative,
                    "synthetic_rates": synthetic_rates if m.speculative else None,
                    "prompts": len({r["prompt_index"] for r in rs}), "repeats": len(reps), "generations": len(rs),
                    "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in rs),
                    "generated_tokens_mean": statistics.mean(r["generated_tokens"] for r in rs),
                    **_spread([v["decode_tokens_per_s"] for v in reps.values()], "decode_tokens_per_s"),
                    **_spread([v["prefill_tokens_per_s"] for v in reps.values()], "prefill_tokens_per_s"),
                    **_spread([v["prefill_with_drafter_tokens_per_s"] for v in reps.values()],
                              "prefill_with_drafter_tokens_per_s"),
                    "time_to_first_token_s": statistics.median(r["time_to_first_token_s"] for r in rs),
                    # the drafter's pass over the prompt, booked as drafting after the first token
                    "drafter_prefill_s": statistics.median(r["drafter_prefill_s"] for r in rs),
                    **_spread(speedups, "speedup"),
                    "prefill_ratio": statistics.median(prefill_ratio) if prefill_ratio else 0.0,
                    "prefill_with_drafter_ratio": statistics.median(prefill_d_ratio) if prefill_d_ratio else 0.0,
                    "drafts": drafts, "drafted_tokens": drafted, "accepted_tokens": accepted,
                    "acceptance_rate": _ratio(accepted, drafted),
                    "acceptance_by_position": by_pos,
                    "mean_acceptance_length": 1 + _ratio(accepted, drafts) if drafts else 1.0,
                    "mean_draft_length": _ratio(drafted, drafts),
                    "draft_s": sum(r["draft_s"] for r in rs), "verify_s": sum(r["verify_s"] for r in rs),
                    "drafter_memory_bytes": max(r["drafter_memory_bytes"] for r in rs),
                    # one sequence's, at its end: the main model's caches and what its drafter holds for it alone
                    "cache_bytes": max((r["cache_bytes"] for r in rs if "cache_bytes" in r), default=None),
                    "drafter_sequence_bytes": max((r["drafter_sequence_bytes"] for r in rs
                                                   if "drafter_sequence_bytes" in r), default=None),
                    "weight_bytes_per_token": _ratio(sum(wbytes), dec_tokens) if len(wbytes) == len(rs) else None,
                }
                if all(r.get("rounds") for r in rs):  # over several ranks: the collectives of a decode round
                    rounds = sum(r["rounds"] for r in rs)
                    rec.update(rounds=rounds, collective_s_per_round=_ratio(sum(r["collective_s"] for r in rs), rounds),
                               collective_bytes_per_round=_ratio(sum(r["collective_bytes"] for r in rs), rounds),
                               round_s=_ratio(sum(r["decode_s"] for r in rs), rounds))
                records.append(rec)
    return records
