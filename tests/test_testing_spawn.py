"""The harness's children die with the test run, but not with the thread that started them.

PR_SET_PDEATHSIG fires when the forking *thread* exits. The chaos suite restarts NATS nodes and
services from ``asyncio.to_thread``; those children used to die when the test's event loop shut
its executor down, which looked like a Parley bug on the next scenario.
"""

from __future__ import annotations

import subprocess
import threading

import pytest

from parley.testing import nats_server
from parley.testing.nats_server import spawn


def _start_in_short_lived_thread(start) -> subprocess.Popen:
    box: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: box.append(start()))
    thread.start()
    thread.join()  # the thread has exited: a death signal tied to it has been sent by now
    return box[0]


def _died_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture
def die_with_parent(monkeypatch):
    monkeypatch.setenv("PARLEY_CHILDREN_DIE_WITH_PARENT", "1")
    if nats_server._LIBC is None:  # noqa: SLF001
        pytest.skip("prctl needs Linux libc; this harness feature is off elsewhere")


def test_hazard_exists_without_the_spawner_thread(die_with_parent):
    """Control: the same hook on a plain Popen from a thread kills the child with the thread."""
    hook = nats_server._die_with_parent_hook()  # noqa: SLF001
    proc = _start_in_short_lived_thread(lambda: subprocess.Popen(["sleep", "30"], preexec_fn=hook))
    try:
        assert _died_within(proc, 5), "child outlived its forking thread: the control is wrong"
    finally:
        proc.kill()
        proc.wait()


def test_spawned_child_outlives_the_thread_that_asked_for_it(die_with_parent):
    proc = _start_in_short_lived_thread(lambda: spawn(["sleep", "30"]))
    try:
        assert not _died_within(proc, 1.0), f"child died with its thread (exit {proc.returncode})"
    finally:
        proc.kill()
        proc.wait()
