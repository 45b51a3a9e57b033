"""Step times with and without the whole-layer step kernels (kernels/layer_step.cpp), alternating in one process.

BENCHMARKS.md section W:
    .venv/bin/python scripts/layer_step_ab.py demo --threads 1 --calls 100
    .venv/bin/python scripts/layer_step_ab.py build/q08b --threads 2 --calls 4
"Module path" turns the layer kernels off (DecoderLayer.step_weights returns None), so each layer runs its module
code with the same fused op kernels; both paths give the same bits (tests/test_kernels.py). The whole-stack call
(section X) is off in both: scripts/stack_step_ab.py measures it.
"""
import argparse
import statistics
import time

import torch

from mtpx.llm import LLM
from mtpx.models.qwen3_5 import DecoderLayer, Qwen35Model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=50, help="calls per timing")
    p.add_argument("--rounds", type=int, default=6, help="alternations of the two paths")
    p.add_argument("--context", type=int, default=256)
    args = p.parse_args()
    llm = LLM(args.model, threads=args.threads)
    Qwen35Model._step_stack = lambda self: None
    m = llm.model
    state, mtp_state = m.new_state(args.context + 16), m.new_mtp_state(args.context + 16)
    layer_path = DecoderLayer.step_weights
    ids = torch.randint(0, m.cfg.vocab_size, (1, args.context + 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden = m(ids[:, :-1], [state], "prefill")
        m.mtp_forward(hidden, ids[:, 1:], [mtp_state], "prefill")

        def main_step(rows: int):
            def run():
                state.mark()
                m.logits(m(ids[:, :rows], [state], "step"), step=True)
                state.rollback(state.length - rows)
            return run

        def mtp_step():
            mtp_state.mark()
            m.logits(m.mtp_forward(hidden[:, -1:], ids[:, -1:], [mtp_state], "step"), step=True)
            mtp_state.rollback(mtp_state.length - 1)

        cases = {"decode step (1 row + lm_head)": main_step(1), "verify of 4 rows (+ lm_head)": main_step(4),
                 "MTP step (+ full lm_head)": mtp_step}
        times = {(c, path): [] for c in cases for path in ("module", "layer")}
        for _ in range(args.rounds):
            for path in ("module", "layer"):
                DecoderLayer.step_weights = layer_path if path == "layer" else (lambda self: None)
                for c, run in cases.items():
                    run()
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        run()
                    times[(c, path)].append((time.perf_counter() - t0) / args.calls * 1e3)
        DecoderLayer.step_weights = layer_path
    print(f"{args.model}, {torch.get_num_threads()} thread(s), medians of {args.rounds} alternations")
    for c in cases:
        a, b = statistics.median(times[(c, "module")]), statistics.median(times[(c, "layer")])
        print(f"  {c}: module path {a:.3f} ms, layer kernels {b:.3f} ms: {a / b:.2f}x")


if __name__ == "__main__":
    main()
