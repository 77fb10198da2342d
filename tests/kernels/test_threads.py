"""The intra-op threads of the engine's steps (engine/threads.py): all of torch's, or one fewer
while decode steps run faster on it, tried in windows of decode steps while the engine
serves; a flag, batch-invariant mode or a single thread pin the count. Every step runs on
its count and leaves the caller's setting as it found it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from packserve.engine import Engine
from packserve.engine.threads import CLEAR_SLOWDOWN, ThreadTuner
from packserve.scheduler import SamplingParams


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_trial(tuner: ThreadTuner, ms_per_token: dict[int, float], tokens: int = 64) -> list[int]:
    """Feed the tuner decode steps until a trial ends; the count each step ran on."""
    ran = []
    trials = tuner.trials
    while tuner.trials == trials:
        threads = tuner.threads
        ran.append(threads)
        tuner.observe(threads, ms_per_token[threads] * tokens / 1000, tokens)
    return ran


def test_a_trial_runs_both_counts_in_windows_and_keeps_the_faster() -> None:
    tuner = ThreadTuner((2, 1), window=3 * 64, hold=5 * 64)  # steps of 64 tokens
    assert tuner.threads == 2  # all threads until a trial says otherwise
    ran = run_trial(tuner, {2: 0.75, 1: 0.62})  # as the tiny model served at c=64
    assert ran == [2] * 3 + [1] * 6 + [2] * 3  # chosen / other / other / chosen
    assert tuner.choice == 1 and tuner.threads == 1
    assert tuner.fewer_over_all == pytest.approx(0.62 / 0.75)
    # held for `hold` steps, then tried again: now the other count wins back
    assert tuner.holding == 5 * 64
    for _ in range(5):
        assert tuner.threads == 1
        tuner.observe(1, 0.05, 64)
    ran = run_trial(tuner, {2: 0.5, 1: 0.8})
    assert ran == [1] * 3 + [2] * 6 + [1] * 3
    assert (tuner.choice, tuner.trials) == (2, 2)


def test_a_clearly_slower_count_ends_its_trial_early() -> None:
    """As SmolLM2 served here: one thread fewer ~1.45x slower. Its second window would cost
    as much again and could not change the choice."""
    tuner = ThreadTuner((2, 1), window=3 * 64, hold=5 * 64)
    ran = run_trial(tuner, {2: 0.5, 1: 0.5 * 1.45})
    assert ran == [2] * 3 + [1] * 3
    assert tuner.choice == 2 and tuner.fewer_over_all == pytest.approx(1.45)
    slightly = ThreadTuner((2, 1), window=3 * 64, hold=5 * 64)  # within CLEAR_SLOWDOWN
    assert len(run_trial(slightly, {2: 0.5, 1: 0.5 * 0.95 * CLEAR_SLOWDOWN})) == 12


def test_a_choice_that_trials_keep_is_held_longer_up_to_a_cap() -> None:
    tuner = ThreadTuner((2, 1), window=64, hold=128, max_hold=320)
    faster_on_one = {2: 0.75, 1: 0.62}
    holds = []
    for _ in range(4):
        run_trial(tuner, faster_on_one)
        holds.append(tuner.holding)
        for _ in range(tuner.holding // 64):  # the hold: all on the choice
            assert tuner.threads == 1
            tuner.observe(1, 0.04, 64)
    assert holds == [128, 256, 320, 320]
    run_trial(tuner, {2: 0.5, 1: 0.8})  # the other count wins: the first hold again
    assert (tuner.choice, tuner.holding) == (2, 128)


def test_a_tie_keeps_all_threads_and_other_steps_are_ignored() -> None:
    tuner = ThreadTuner((4, 3), window=128, hold=256)
    tuner.observe(3, 0.001, 64)  # not the planned count: ignored
    tuner.observe(4, 0.001, 0)  # decoded nothing: ignored
    assert tuner.threads == 4
    run_trial(tuner, {4: 0.5, 3: 0.5})
    assert tuner.choice == 4 and tuner.fewer_over_all == pytest.approx(1.0)


def test_a_drift_in_step_time_weighs_on_both_counts_alike() -> None:
    """Steps that grow slower through a trial (contexts lengthening) favour neither count:
    the windows run chosen / other / other / chosen."""
    tuner = ThreadTuner((2, 1), window=256, hold=512)
    step = 0
    while tuner.trials == 0:
        threads = tuner.threads
        tuner.observe(threads, 0.02 + 0.001 * step, 64)  # the same for both counts
        step += 1
    assert tuner.fewer_over_all == pytest.approx(1.0)
    assert tuner.choice == 2


@pytest.mark.parametrize(
    "bad", [{"counts": (2, 2)}, {"counts": (1, 0)}, {"window": 0}, {"hold": 9, "max_hold": 8}]
)
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        ThreadTuner(**{"counts": (2, 1), **bad})


def spy_on_steps(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(count the engine asked for, count torch ran the forward on) of each step."""
    seen: list[tuple[int, int]] = []
    asked: list[int] = []
    execute, forward = engine.runner.execute, engine.runner.forward

    def noting_execute(output, threads, allowed=None):
        asked.append(threads)
        return execute(output, threads, allowed)

    def noting_forward(*args, **kwargs):
        seen.append((asked[-1], torch.get_num_threads()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", noting_execute)
    monkeypatch.setattr(engine.runner, "forward", noting_forward)
    return seen


def test_the_engine_tries_one_thread_fewer_while_it_decodes(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(2)
    engine = make_engine(threads=None)
    tuner = engine.thread_tuner
    assert tuner is not None and tuner.counts == (2, 1)
    assert (engine.info.threads, engine.info.threads_tuned) == (2, True)
    seen = spy_on_steps(engine, monkeypatch)
    torch.set_num_threads(3)  # the caller's own setting, between steps
    prompts = [f"sequence {i}" for i in range(8)]
    steps = 4 * tuner.window // len(prompts) + 8  # decode steps of 8 tokens: one whole trial
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert all(len(out.token_ids) == steps for out in outs)
    assert tuner.trials == 1 and tuner.choice in (1, 2)
    assert {asked for asked, _ in seen} == {1, 2}  # both counts ran
    assert all(asked == ran for asked, ran in seen)  # each forward on the count asked for
    assert torch.get_num_threads() == 3  # left as the caller had it
    assert engine.last_stats is not None and engine.last_stats.threads == tuner.threads


@pytest.mark.parametrize(
    ("overrides", "threads"),
    [({"threads": 3}, 3), ({"threads": None, "batch_invariant": True}, 2)],
    ids=["flag", "batch-invariant"],
)
def test_a_flag_or_batch_invariant_mode_pins_the_count(
    make_engine: Callable[..., Engine],
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict,
    threads: int,
) -> None:
    torch.set_num_threads(2)
    engine = make_engine(**overrides)
    assert engine.thread_tuner is None
    assert (engine.info.threads, engine.info.threads_tuned) == (threads, False)
    seen = spy_on_steps(engine, monkeypatch)
    torch.set_num_threads(1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.generate(["a pinned count"], params)
    assert {ran for _, ran in seen} == {threads}
    assert torch.get_num_threads() == 1
