"""The interrupt coalescing policy, driven with a fake clock."""

from __future__ import annotations

import random

import pytest

from vblk.virtio.coalesce import GROW_AFTER, MAX_BATCH, RETRY_AFTER, Coalescer

US = 1000


def test_off_signals_every_completion() -> None:
    c = Coalescer(0)
    assert [c.completed(n, now=0) for n in (1, 5, 1)] == [True, True, True]
    assert not c.completed(0, now=0)  # nothing new, nothing to say
    assert c.deadline == 0 and c.goal == 1 and c.held == 0


@pytest.mark.parametrize("hold_ns,max_batch", [(-1, 16), (100, 0)])
def test_bad_settings_are_refused(hold_ns: int, max_batch: int) -> None:
    with pytest.raises(ValueError):
        Coalescer(hold_ns, max_batch)


def test_a_guest_waiting_on_each_request_is_never_held() -> None:
    """QD1: completions come one at a time, so each is signalled at once."""
    c = Coalescer(200 * US)
    for t in range(1000):
        assert c.completed(1, now=t * 100 * US)
    assert c.goal == 1 and c.held == 0 and c.timeouts == 0


def test_the_goal_grows_while_batches_fill_up() -> None:
    c = Coalescer(200 * US)
    assert c.completed(2, now=0)  # two at once: the guest keeps several in flight
    assert c.goal == 2
    t = 0
    goals = []
    for _ in range(6 * GROW_AFTER):
        t += US
        assert not c.completed(1, now=t)
        assert c.deadline == t + 200 * US
        assert c.completed(c.goal - 1, now=t + US)
        goals.append(c.goal)
    assert goals[-1] == MAX_BATCH
    assert goals == sorted(goals)  # only up
    assert c.held == 6 * GROW_AFTER and c.timeouts == 0


def test_a_hold_that_times_out_learns_what_arrived() -> None:
    c = Coalescer(200 * US, max_batch=8)
    c.goal = 8
    assert not c.completed(2, now=1000)
    assert not c.completed(1, now=1000 + 50 * US)
    assert c.deadline == 1000 + 200 * US  # from the oldest held completion
    assert not c.expire(1000 + 199 * US)
    assert c.expire(1000 + 200 * US)
    assert (c.goal, c.ceiling, c.pending, c.deadline, c.timeouts) == (3, 3, 0, 0, 1)
    assert not c.expire(10**12)  # nothing held, nothing due
    assert c.completed(3, now=10**9)  # the learned size goes out without waiting


def test_the_ceiling_is_tried_again_after_full_batches() -> None:
    c = Coalescer(200 * US, max_batch=8)
    c.goal = 8
    c.completed(4, now=0)
    assert c.expire(200 * US)
    assert c.ceiling == 4
    for _ in range(RETRY_AFTER):
        assert c.completed(4, now=0)
    assert c.ceiling == c.goal == 8  # tried at once: the batches have long been full
    assert not c.completed(4, now=0)


def test_a_timeout_at_one_drops_to_signalling_at_once_until_retried() -> None:
    c = Coalescer(200 * US)
    c.goal = 4
    c.completed(1, now=0)
    assert c.expire(200 * US)
    assert (c.goal, c.ceiling) == (1, 1)
    assert c.completed(3, now=0)  # company again, but the ceiling holds it at 1 for now
    assert c.goal == 1
    for _ in range(RETRY_AFTER):
        c.completed(3, now=0)
    assert c.ceiling == 2 and c.goal == 2


def test_flush_releases_what_is_held() -> None:
    c = Coalescer(200 * US)
    c.goal = 4
    assert not c.flush()
    c.completed(1, now=0)
    assert c.flush()
    assert c.pending == 0 and c.deadline == 0
    assert not c.expire(10**12)


@pytest.mark.parametrize("seed", range(20))
def test_no_completion_waits_longer_than_the_hold(seed: int) -> None:
    """Random arrivals; the caller honours deadlines as the IOThread does."""
    rng = random.Random(seed)
    hold = 200 * US
    c = Coalescer(hold)
    t = 0
    waiting: list[int] = []  # when each unsignalled completion was pushed
    waits: list[int] = []
    signals = 0
    for _ in range(3000):
        t += rng.choice([US, 5 * US, 50 * US, 300 * US, 2000 * US])
        due = c.deadline
        if due and due <= t:  # the timer fires before the next completion
            assert c.expire(due)
            waits += [due - w for w in waiting]
            waiting.clear()
            signals += 1
        n = rng.choice([1, 1, 2, 3, 8])
        waiting += [t] * n
        if c.completed(n, now=t):
            waits += [t - w for w in waiting]
            waiting.clear()
            signals += 1
        assert c.pending == len(waiting) < c.max_batch
    assert max(waits) <= hold
    assert signals < 3000 and c.held > 0  # it did coalesce
