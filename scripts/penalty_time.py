"""Demo model, greedy with repetition_penalty 1.1, the `mtpx demo` prompt, 400 tokens: median tok/s of 4 runs
without and with MTP (adaptive k <= 3), and whether the outputs are identical (BENCHMARKS.md section T.6). Run it
alternately on two checkouts (`PYTHONPATH=<other checkout>/src`) to compare them."""
import statistics
import sys
import time

from mtpx import LLM

PROMPT = "import os\n\ndef read_lines(path):\n    \"\"\"Return the lines of a file.\"\"\"\n"


def main() -> None:
    llm = LLM("demo")
    speeds, outputs = {}, {}
    for _ in range(4):
        for mode in ("none", "mtp"):
            kw = dict(spec_type=mode) if mode == "none" else dict(spec_type="mtp", spec_draft_n_max=3)
            start = time.perf_counter()
            r = llm.generate(PROMPT, max_tokens=400, temperature=0, repetition_penalty=1.1, ignore_eos=True, **kw)
            speeds.setdefault(mode, []).append(400 / (time.perf_counter() - start))
            outputs[mode] = r.token_ids
    label = sys.argv[1] if len(sys.argv) > 1 else ""
    print(label, {m: round(statistics.median(v), 1) for m, v in speeds.items()},
          "identical:", outputs["none"] == outputs["mtp"])


if __name__ == "__main__":
    main()
