"""Correctness checks of the CUDA path, for a session with a GPU (the CPU tests cannot run them):

1. static step passes replayed as CUDA graphs against the ordinary (eager) step path: hidden states of passes of
   every width with rollbacks in between, bf16 (close, not equal: the two paths order their sums differently);
2. greedy speculation on the graphs is token-identical to plain decoding on the graphs (MTP k = 1..4, a reduced
   draft vocabulary, n-gram), on the bundled demo model and held-out bench prompts;
3. how often the graph path's plain output equals the eager path's (information: bf16 near-ties may differ);
4. one step's time, eager vs graphs, plain and verify widths.

    python scripts/cuda_check.py [--model demo] [--max-tokens 128] [--prompts 6] > check.json
Speed against plain decoding is `mtpx bench --device cuda` (with --no-cuda-graphs for the eager path).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import mtpx
from mtpx.bench.prompts import load_workloads
from mtpx.runners.static import WIDTH


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare_paths(llm, g: torch.Generator, device: torch.device) -> dict:
    model = llm.model
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 37), generator=g).to(device)
    eager, static = model.new_state(128), llm.runner.new_static_state(model, "main", 128)
    for s in (eager, static):
        model(prompt, [s], "prefill")
    worst = 0.0
    for width, keep in [(1, 1), (4, 2), (WIDTH, 5), (3, 3), (1, 1), (2, 1), (4, 4), (1, 1), (4, 1)]:
        tokens = torch.randint(0, model.cfg.vocab_size, (1, width), generator=g).to(device)
        outs = []
        for s in (eager, static):
            s.mark()
            outs.append(model(tokens, [s], "step").float())
            s.rollback(s.length - width + keep)
        worst = max(worst, (outs[0] - outs[1]).abs().max().item() / outs[0].abs().max().item())
    return {"max_relative_difference": worst, "graphs_captured": len(static.graphs)}


def step_times(llm, device: torch.device, reps: int = 50) -> dict:
    """Median time of one step pass of T positions (decode T = 1, verify T = k + 1), eager and static."""
    model, out = llm.model, {}
    for name, make in (("eager", lambda: model.new_state(1024)),
                       ("graphs", lambda: llm.runner.new_static_state(model, "main", 1024))):
        state = make()
        model(torch.zeros(1, 300, dtype=torch.long, device=device), [state], "prefill")
        for T in (1, 2, 4, 5):
            tokens = torch.zeros(1, T, dtype=torch.long, device=device)
            times = []
            for i in range(reps + 3):
                state.mark()
                sync(device)
                t0 = time.perf_counter()
                model(tokens, [state], "step")
                sync(device)
                times.append(time.perf_counter() - t0)
                state.rollback(state.length - T)
            out[f"{name}_T{T}_ms"] = 1e3 * sorted(times[3:])[len(times[3:]) // 2]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the same static passes, without graphs")
    ap.add_argument("--dtype", default="bf16", help="bf16, or int8 / int4 (weights on the Triton kernels)")
    ap.add_argument("--no-eager", action="store_true", help="skip decoding on the eager path (check 3)")
    ap.add_argument("--steps-only", action="store_true", help="checks 1 and 4 only (no decoding)")
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    result = {"torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "triton_gdn": os.environ.get("MTPX_TRITON_GDN", "1") != "0"}
    result["dtype"] = args.dtype
    llm = mtpx.LLM(args.model, device=args.device, dtype=args.dtype, static_steps=True)
    with torch.inference_mode():
        result["paths"] = compare_paths(llm, torch.Generator().manual_seed(0), device)
        log(f"paths: {result['paths']}")
        result["step_times"] = step_times(llm, device)
        log(f"step times: {result['step_times']}")
    if args.steps_only:
        print(json.dumps(result, indent=1))
        return 0
    modes = {"mtp1": dict(spec_type="mtp", spec_draft_n_max=1), "mtp2": dict(spec_type="mtp", spec_draft_n_max=2),
             "mtp3": dict(spec_type="mtp", spec_draft_n_max=3), "mtp4": dict(spec_type="mtp", spec_draft_n_max=4),
             "mtp3v2048": dict(spec_type="mtp", spec_draft_n_max=3, spec_draft_vocab=2048),
             "ngram3": dict(spec_type="ngram", spec_draft_n_max=3)}
    eager_llm = mtpx.LLM(args.model, device=args.device, dtype=args.dtype, static_steps=False)
    lossless = {m: {"identical": 0, "prompts": 0, "accepted": 0, "drafted": 0} for m in modes}
    eager_same = 0
    n = 0
    for w in load_workloads(["code", "chat"], None, args.prompts, args.max_tokens):
        for text in w.texts(llm.tokenizer):
            n += 1
            ref = llm.generate(text, max_tokens=w.max_tokens, ignore_eos=True)
            if not args.no_eager:
                eager = eager_llm.generate(text, max_tokens=w.max_tokens, ignore_eos=True)
                eager_same += eager.token_ids == ref.token_ids
            for m, kw in modes.items():
                out = llm.generate(text, max_tokens=w.max_tokens, ignore_eos=True, spec_draft_policy="fixed", **kw)
                r = lossless[m]
                r["prompts"] += 1
                r["identical"] += out.token_ids == ref.token_ids
                r["accepted"] += out.stats["accepted_tokens"]
                r["drafted"] += out.stats["drafted_tokens"]
            log(f"{w.name} prompt {n}: " + ", ".join(f"{m} {r['identical']}/{r['prompts']}" for m, r in lossless.items()))
    result["lossless"] = lossless
    if not args.no_eager:
        result["plain_graphs_equal_plain_eager"] = f"{eager_same}/{n}"
    result["compile_step_ops"] = os.environ.get("MTPX_COMPILE_STEP_OPS", "1") != "0"
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))
    return 0 if all(r["identical"] == r["prompts"] for r in lossless.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
