"""Step times with and without the whole-stack step call (kernels.StackStep), alternating in one process.

BENCHMARKS.md section X:
    .venv/bin/python scripts/stack_step_ab.py demo --threads 1 --calls 100 --rounds 8
"Layers" turns the stack call off (Qwen35Model._step_stack returns None), so each layer runs its own whole-layer
kernel call from Python (section W); both give the same bits (tests/test_kernels.py).
"""
import argparse
import statistics
import time

import torch

from mtpx.llm import LLM
from mtpx.models.qwen3_5 import Qwen35Model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=100, help="calls per timing")
    p.add_argument("--rounds", type=int, default=8, help="alternations of the two paths")
    p.add_argument("--context", type=int, default=256)
    args = p.parse_args()
    llm = LLM(args.model, threads=args.threads)
    m = llm.model
    stack_path = Qwen35Model._step_stack
    state = m.new_state(args.context + 16)
    ids = torch.randint(0, m.cfg.vocab_size, (1, args.context + 8), generator=torch.Generator().manual_seed(0))
    rows = (1, 2, 3, 4, 5)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        m(ids[:, :args.context], [state], "prefill")
        for _ in range(args.rounds):
            for path in ("layers", "stack"):
                Qwen35Model._step_stack = stack_path if path == "stack" else (lambda self: None)
                for r in rows:
                    tokens = ids[:, :r]

                    def run():
                        state.mark()
                        m.logits(m(tokens, [state], "step"), step=True)
                        state.rollback(state.length - r)
                    run()
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        run()
                    times.setdefault((path, r), []).append((time.perf_counter() - t0) / args.calls * 1e3)
        Qwen35Model._step_stack = stack_path
    print(f"{args.model}, {torch.get_num_threads()} thread(s), ms per step pass (+ lm_head) of 1..5 rows, medians of "
          f"{args.rounds} alternations")
    for path in ("layers", "stack"):
        med = [statistics.median(times[(path, r)]) for r in rows]
        print(f"  {path}: " + " ".join(f"{t:.3f}" for t in med) + "   relative to 1 row: "
              + " ".join(f"{t / med[0]:.2f}" for t in med))


if __name__ == "__main__":
    main()
