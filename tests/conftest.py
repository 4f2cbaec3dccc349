"""Shared fixtures. Append new ones; keep each one small and say what it guards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

# Threads the server creates are all named with this prefix (batcher workers, model loader).
_SERVER_THREAD_PREFIX = "vaeserve"
_THREAD_EXIT_WAIT_S = 5.0


@pytest.fixture(autouse=True)
def no_leaked_server_threads() -> Iterator[None]:
    """Fail a test that leaves a server's or a batcher's thread running behind it.

    Threads started by fixtures of a wider scope exist before the test and are not counted.
    """
    before = set(threading.enumerate())
    yield
    new = [
        t
        for t in threading.enumerate()
        if t not in before and t.name.startswith(_SERVER_THREAD_PREFIX)
    ]
    for thread in new:  # a thread told to stop may still be on its way out
        thread.join(_THREAD_EXIT_WAIT_S)
    leaked = [t.name for t in new if t.is_alive()]
    assert not leaked, f"the test left server threads running: {leaked}"


@pytest.fixture
def torch_single_thread() -> Iterator[None]:
    """Run a test's tiny torch models on one intra-op thread, then restore the count.

    On this 2-core machine shared with other work, torch's default of 2 threads makes the
    small matrix products of a tiny model spin on a busy core: ~35× slower, measured.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def figure(request) -> Callable[[str, object], None]:
    """Records a figure of the test in its report (user_properties), for docs/reliability.md."""
    return lambda name, value: request.node.user_properties.append((name, value))
