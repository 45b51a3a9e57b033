"""A drafter's per-sequence state: its pending positions pile up in pieces and are trimmed to the prompt's head and
the latest tail, each hidden state staying with its token."""
import torch

from mtpx.speculative.draft_state import DraftState


def test_trim_keeps_the_head_and_the_latest_tail_with_their_hidden_states():
    d = DraftState(state=None, hidden=torch.arange(5.0)[:, None], tokens=list(range(5)))  # a prompt of 5
    for start in range(5, 40, 3):  # rounds adding 3 positions each, in pieces
        d.add_pending(torch.arange(float(start), start + 3)[:, None], list(range(start, start + 3)))
        d.trim(5, 4)
        assert len(d.pending_tokens) <= 5 + 2 * 4
    assert d.pending_tokens[:5] == [0, 1, 2, 3, 4] and d.pending_tokens[-4:] == [37, 38, 39, 40]
    assert d.pending_hidden[:, 0].tolist() == [float(t) for t in d.pending_tokens]  # states stay with their tokens
    d.clear_pending()
    assert d.pending_hidden is None and d.pending_tokens == []
