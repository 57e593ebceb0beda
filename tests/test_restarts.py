"""``edgestream up``'s restart policy (gateway/restarts.py), on made-up exits: no processes."""

from __future__ import annotations

from gateway.restarts import Restarts
from stream.backoff import Backoff

NO_JITTER = Backoff(initial_s=0.5, max_s=10.0, jitter=0.0)


def test_a_process_that_crashes_after_running_a_while_comes_back_at_once_each_time():
    restarts = Restarts(backoff=NO_JITTER, stable_s=30)
    assert [restarts.after_exit(-9, ran_s=3600) for _ in range(10)] == [0.5] * 10
    assert restarts.restarts == 10


def test_quick_exits_in_a_row_back_off_then_it_is_given_up():
    restarts = Restarts(backoff=NO_JITTER, stable_s=30, max_quick_exits=4)
    assert [restarts.after_exit(1, ran_s=2) for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert restarts.after_exit(1, ran_s=2) is None
    assert "5 times in a row" in restarts.why_not(1)


def test_a_stable_run_resets_the_count():
    restarts = Restarts(backoff=NO_JITTER, stable_s=30, max_quick_exits=3)
    restarts.after_exit(1, ran_s=1)
    restarts.after_exit(1, ran_s=1)
    assert restarts.after_exit(1, ran_s=31) == 0.5
    assert restarts.after_exit(1, ran_s=1) == 1.0


def test_a_usage_or_config_error_is_not_restarted():
    restarts = Restarts(backoff=NO_JITTER)
    assert restarts.after_exit(2, ran_s=100) is None
    assert "exit 2" in restarts.why_not(2) and restarts.restarts == 0
