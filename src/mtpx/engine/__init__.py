"""The engine: sequences, drafter, draft policy and stats around the decode loop (speculative/loop.py).

`LLM` (one request at a time) and the server's scheduler (many, batched) are both clients of `Engine`. Modules:
params.py (SamplingParams, SpecConfig and their parsers), flags.py (their CLI flags), sequence.py (Sequence),
stats.py (the stats of a generation), request.py (text, stop strings, Completion), grouped.py (batched drafting),
engine.py (Engine). This package imports nothing eagerly: mtpx.sampling imports params.py from here.
"""
