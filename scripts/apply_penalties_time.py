"""apply_penalties against the full-vocabulary version it replaced (kept here): same bits, and microseconds per call
(best of 3 × 300 calls) for 1 and 3 rows at 400 and 2000 tokens of random history, 8192-token vocabulary.
BENCHMARKS.md section R.
    .venv/bin/python scripts/apply_penalties_time.py
"""
import time, torch
from mtpx.sampling import SamplingParams, apply_penalties
def orig(logits, params, tokens, n_prompt, drafts=()):
    rows, vocab = logits.shape
    extra = torch.zeros(rows, vocab, device=logits.device)
    for j, d in enumerate(drafts[:rows - 1]):
        extra[j + 1:, d] += 1
    generated = torch.tensor(tokens[n_prompt:], dtype=torch.long, device=logits.device)
    counts = torch.bincount(generated, minlength=vocab)[:vocab].float() + extra
    out = logits.float().clone()
    if params.repetition_penalty != 1:
        seen = counts > 0
        seen[:, torch.tensor(tokens[:n_prompt], dtype=torch.long, device=logits.device)] = True
        r = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
    return out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
p = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.1)
for hist in (400, 2000):
    tokens = torch.randint(0, 8192, (hist,), generator=g).tolist()
    for rows in (1, 3):
        logits = torch.randn(rows, 8192, generator=g).bfloat16()
        drafts = tokens[:rows - 1]
        assert torch.equal(orig(logits, p, tokens, 20, drafts), apply_penalties(logits, p, tokens, 20, drafts))
        res = {}
        for rep in range(3):
            for name, f in (("original", orig), ("now", apply_penalties)):
                t = time.perf_counter()
                for _ in range(300): f(logits, p, tokens, 20, drafts)
                res.setdefault(name, []).append((time.perf_counter() - t) / 300 * 1e6)
        print(hist, rows, {k: round(min(v)) for k, v in res.items()})
