"""Demo decoding on 1 thread, on 2, and with the thread tuner (mtpx/threads.py), alternating in one process.

BENCHMARKS.md section X (run it once on a quiet machine and once with a busy core, e.g. beside
`python3 -c 'while 1: pass'`):
    .venv/bin/python scripts/thread_tuner_ab.py --rounds 4
"""
import argparse
import os
import statistics
import time

import torch

os.environ.pop("MTPX_THREADS", None)
from mtpx.llm import LLM  # noqa: E402

PROMPTS = ["import os\nimport sys\n\n\ndef read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"\n",
           "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"]
MODES = {"plain": {}, "mtp3v2048": dict(spec_type="mtp", spec_draft_n_max=3, spec_draft_vocab=2048)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()
    tuned, fixed = LLM("demo"), LLM("demo", threads=1)

    def tok_s(setting, kwargs) -> float:
        llm = tuned if setting == "tuned" else fixed
        torch.set_num_threads(tuned.thread_tuner.current if setting == "tuned" else setting)
        n, t0 = 0, time.perf_counter()
        for prompt in PROMPTS:
            n += len(llm.generate(prompt, max_tokens=args.max_tokens, temperature=0.0, **kwargs).token_ids)
        return n / (time.perf_counter() - t0)

    settings = (1, 2, "tuned")
    for s in settings:  # warm-up
        for kwargs in MODES.values():
            tok_s(s, kwargs)
    res: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for s in settings:
            for mode, kwargs in MODES.items():
                res.setdefault((s, mode), []).append(tok_s(s, kwargs))
    for mode in MODES:
        print(f"{mode}: " + ", ".join(f"{s}: {statistics.median(res[(s, mode)]):.0f}" for s in settings) + " tok/s")
    t = tuned.thread_tuner
    print(f"tuner: last measured {t.rates}, on {t.current} thread(s), {t.switches} switches")


if __name__ == "__main__":
    main()
