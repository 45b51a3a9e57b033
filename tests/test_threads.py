import pytest
import torch

from mtpx import threads
from mtpx.threads import ThreadTuner


class Machine:
    """Decode rounds of 8 tokens whose time depends on the thread count, as a tuner sees them."""

    def __init__(self, seconds_per_round: dict[int, float]):
        self.seconds = seconds_per_round
        self.threads = None
        self.history: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n

    def run(self, tuner: ThreadTuner, rounds: int) -> None:
        for _ in range(rounds):
            self.history.append(self.threads)
            tuner.observe(8, self.seconds[self.threads])


def test_tuner_measures_each_count_then_keeps_the_fastest():
    machine = Machine({1: 1.0, 2: 0.7})
    tuner = ThreadTuner([1, 2], machine.set_threads)
    machine.run(tuner, 40)
    assert tuner.rates[2] > tuner.rates[1]
    assert set(machine.history[:20]) == {1, 2}  # both measured first
    assert machine.history[-10:] == [2] * 10


def test_the_reported_measurement_keeps_one_context_when_the_work_changes():
    """After a change of context (plain rounds, then MTP rounds) the count in use is rebased in `rates`; `measured`
    still holds the last complete measurement, both counts on the same work."""
    machine = Machine({1: 1.0, 2: 0.7})
    tuner = ThreadTuner([1, 2], machine.set_threads)
    machine.run(tuner, 40)
    complete = dict(tuner.measured)
    assert set(complete) == {1, 2} and complete[2] > complete[1]
    machine.seconds = {1: 0.5, 2: 0.35}  # MTP rounds: twice the tokens per second on either count
    for _ in range(8):
        tuner.observe(8, machine.seconds[machine.threads], context="mtp")
    assert tuner.rates[2] > 2 * tuner.rates[1]  # rebased 2, stale 1: not a comparison
    assert tuner.measured == complete


def test_tuner_moves_to_one_thread_when_the_other_core_gets_busy_and_back_when_it_frees():
    machine = Machine({1: 1.0, 2: 0.7})
    tuner = ThreadTuner([1, 2], machine.set_threads)
    machine.run(tuner, 40)
    assert machine.threads == 2
    machine.seconds = {1: 1.0, 2: 3.0}  # another process keeps a core busy: 2 threads stall
    machine.run(tuner, 20)  # the slowdown starts a new measurement at once, not after the interval
    assert machine.threads == 1
    machine.seconds = {1: 1.0, 2: 0.7}
    machine.run(tuner, threads.MAX_INTERVAL * 6)  # found again at the next scheduled measurement
    assert machine.threads == 2


def test_tuner_measures_less_often_while_its_choice_holds():
    machine = Machine({1: 1.0, 2: 0.7})
    tuner = ThreadTuner([1, 2], machine.set_threads)
    machine.run(tuner, 2000)
    assert tuner.interval == threads.MAX_INTERVAL
    tail = machine.history[-1000:]
    assert tail.count(1) < 0.05 * len(tail)  # re-measuring one thread costs little time


def test_tuner_stops_scheduled_measurements_when_all_cores_win_by_far():
    """A large model: both cores ~1.8x one. Only contention could change that, and its slowdown is caught at once."""
    machine = Machine({1: 1.0, 2: 0.55})
    tuner = ThreadTuner([1, 2], machine.set_threads)
    machine.run(tuner, 20)
    assert tuner.preferred == 2 and tuner.interval == threads.MAX_INTERVAL
    machine.run(tuner, 500)
    assert machine.history[20:].count(1) == 0
    machine.seconds = {1: 1.0, 2: 3.0}
    machine.run(tuner, 20)
    assert machine.threads == 1 and tuner.interval == threads.FIRST_INTERVAL  # back to the short schedule


def test_a_change_of_work_is_not_taken_for_a_slowdown():
    """Plain decoding after MTP emits fewer tokens a second on any count. Named as a new context, its rate becomes
    the reference; unnamed, it looks like a slowdown and both counts are measured again."""
    for name_it in (True, False):
        machine = Machine({1: 1.0, 2: 0.7})
        tuner = ThreadTuner([1, 2], machine.set_threads)
        for _ in range(12):  # the first measurement: 2 threads chosen, next scheduled one 8 windows away
            tuner.observe(8, machine.seconds[machine.threads], "mtp")
        assert machine.threads == 2 and tuner.windows_left == threads.FIRST_INTERVAL
        switches = tuner.switches
        for _ in range(20):  # 2 tokens a round in the same time: 4x fewer tokens a second on either count
            tuner.observe(2, machine.seconds[machine.threads], "plain" if name_it else "mtp")
        assert machine.threads == 2
        assert (tuner.switches == switches) == name_it


def test_tuner_needs_a_count():
    with pytest.raises(ValueError):
        ThreadTuner([])


def test_llm_output_is_the_same_while_the_tuner_switches_threads(dense_ckpt, monkeypatch):
    """Thread switches between rounds change no token: kernels give the same bits on any thread count."""
    from mtpx.llm import LLM
    kwargs = dict(max_tokens=40, temperature=0.0, spec_type="mtp", spec_draft_n_max=3)
    fixed = LLM(dense_ckpt).generate("hello world", **kwargs)
    monkeypatch.delenv("MTPX_THREADS")
    monkeypatch.setattr(threads, "WINDOW_TOKENS", 1)
    monkeypatch.setattr(threads, "WINDOW_ROUNDS", 1)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    try:
        llm = LLM(dense_ckpt)
        assert llm.thread_tuner is not None
        tuned = llm.generate("hello world", **kwargs)
        assert llm.thread_tuner.switches >= 3
    finally:
        torch.set_num_threads(1)
    assert tuned.token_ids == fixed.token_ids and tuned.text == fixed.text
