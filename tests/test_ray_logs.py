"""Ray's worker log lines in a driver's log file (no Ray cluster needed: the fast tier)."""
from __future__ import annotations


def test_worker_lines_carry_no_colour_codes_into_a_log_file():
    """Ray wraps each worker line's prefix in ANSI colours unless RAY_COLOR_PREFIX=0: set when the driver's output
    is not a terminal, never over the user's own value."""
    import io

    from peftbench.executors.ray import plain_worker_logs

    class Tty(io.StringIO):
        def isatty(self):
            return True

    env: dict = {}
    assert plain_worker_logs(env, (io.StringIO(), io.StringIO())) and env == {"RAY_COLOR_PREFIX": "0"}
    env = {}
    assert not plain_worker_logs(env, (Tty(), Tty())) and env == {}  # a terminal keeps Ray's colours
    env = {"RAY_COLOR_PREFIX": "1"}
    assert not plain_worker_logs(env, (io.StringIO(),)) and env == {"RAY_COLOR_PREFIX": "1"}
