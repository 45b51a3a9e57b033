"""The server's scheduler in-process, without HTTP: B requests at once, spec types alternated, aggregate tok/s.
Separates the engine's cost of a spec type at a batch size from the server's (loadtest measures both).

    python scripts/scheduler_streams_ab.py [--model demo] [--streams 8] [--spec-types none mtp] [--alternations 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mtpx
from mtpx.bench.prompts import load_workloads
from mtpx.sampling import SamplingParams
from mtpx.serve.scheduler import GenRequest, Scheduler, SpecConfig


def run(llm, prompts: list[list[int]], spec: str, max_tokens: int) -> tuple[float, int]:
    """All prompts submitted at once, the scheduler's loop driven on this thread; (tok/s, drafted tokens)."""
    sched = Scheduler(llm, SpecConfig(spec_type=spec))
    got = {"tokens": 0, "drafted": 0}

    def sink(delta):
        got["tokens"] += len(delta.token_ids)
        if delta.finish_reason:
            got["drafted"] += delta.stats.get("draft_tokens", 0)
    for p in prompts:
        sched.submit(GenRequest(p, max_tokens, SamplingParams(temperature=0.0), sink=sink, ignore_eos=True))
    t0 = time.perf_counter()
    with torch.inference_mode():
        while sched._running or sched._waiting:
            for r in sched._take_admissions():
                sched._prefill(r)
            if sched.policy is not None:
                sched.policy.skip_gap()
            if sched._running:
                sched._decode()
    return got["tokens"] / (time.perf_counter() - t0), got["drafted"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--spec-types", nargs="+", default=["none", "mtp"])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--alternations", type=int, default=10)
    args = ap.parse_args()
    llm = mtpx.LLM(args.model)
    texts = list(load_workloads(["code"], None, args.streams, args.max_tokens)[0].texts(llm.tokenizer))
    prompts = [llm.tokenizer.encode(t) if isinstance(t, str) else t for t in texts][:args.streams]
    for spec in args.spec_types:  # warm-up
        run(llm, prompts, spec, args.max_tokens)
    speeds: dict[str, list[float]] = {s: [] for s in args.spec_types}
    for _ in range(args.alternations):
        for spec in args.spec_types:
            tps, drafted = run(llm, prompts, spec, args.max_tokens)
            speeds[spec].append(tps)
            print(f"{spec}: {tps:.0f} tok/s, {drafted} tokens drafted", flush=True)
    base = args.spec_types[0]
    for spec in args.spec_types[1:]:
        ratios = [a / b for a, b in zip(speeds[spec], speeds[base])]
        print(f"{spec} / {base}: paired mean {statistics.mean(ratios):.3f}, median {statistics.median(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} alternations")


if __name__ == "__main__":
    main()
